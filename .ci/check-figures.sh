#!/usr/bin/env bash
# Every figure that README.md and benches/RESULTS.md show from a command's output is
# checked against that command's output. A block of such figures sits between
#
#   <!-- figures: COMMAND -->
#   ...exactly what COMMAND prints on standard output...
#   <!-- /figures -->
#
# and this script runs COMMAND and compares, byte for byte. Prose that quotes such figures
# sits between
#
#   <!-- figures-in: COMMAND -->
#   ...
#   <!-- /figures-in -->
#
# and every number in it (`code`, dates and headings aside) must appear in COMMAND's output:
# a figure edited by hand, or left behind when the output changed, fails the check.
#
#   .ci/check-figures.sh           # check: fails with a diff if a block is stale
#   .ci/check-figures.sh --update  # rewrite every block from its command's output
#
# Only deterministic outputs are put in such blocks: the chaos demo and the scenario bench
# run on a paused tokio clock against the seeded simulator. `cargo bench` commands are run
# with `--profile dev` (FIGURES_BENCH_PROFILE overrides it) so that CI reuses the test
# build instead of compiling every dependency again with optimisations: on a virtual clock
# the figures do not depend on the profile. Criterion timings (ns per call) and allocation
# counts are measurements of one machine and are not in such blocks; RESULTS.md says where
# and when each was taken.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import difflib, os, re, subprocess, sys

update = "--update" in sys.argv[1:]
profile = os.environ.get("FIGURES_BENCH_PROFILE", "dev")
files = ["README.md", "benches/RESULTS.md"]
block = re.compile(r"(<!-- figures: (.+?) -->\n)(.*?)(<!-- /figures -->)", re.S)
outputs = {}

def run(command):
    if command not in outputs:
        argv = command.split()
        if argv[:2] == ["cargo", "bench"] and "--profile" not in argv:
            argv[2:2] = ["--profile", profile]
        if argv[:1] == ["cargo"] and "-q" not in argv:
            argv[2:2] = ["-q"]
        print(f"==> {' '.join(argv)}", file=sys.stderr, flush=True)
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"`{command}` failed with status {done.returncode}")
        outputs[command] = done.stdout
    return outputs[command]

stale = 0
stale_prose = 0
checked = 0
number = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:%|s\b))?")

def numbers(text):
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\d{4}-\d{2}-\d{2}", "", text)
    return number.findall(text)

prose = re.compile(r"<!-- figures-in: (.+?) -->\n(.*?)<!-- /figures-in -->", re.S)
for path in files:
    text = open(path, encoding="utf-8").read()
    def check(m):
        global stale, checked
        command, shown = m.group(2), m.group(3)
        printed = run(command)
        checked += 1
        if shown != printed:
            stale += 1
            if not update:
                sys.stderr.writelines(difflib.unified_diff(
                    shown.splitlines(True), printed.splitlines(True),
                    f"{path} (figures of `{command}`)", f"what `{command}` prints"))
        return m.group(1) + printed + m.group(4)
    new = block.sub(check, text)
    for m in prose.finditer(new):
        command, span = m.group(1), m.group(2)
        printed = set(numbers(run(command)))
        checked += 1
        missing = [n for n in numbers(span) if n not in printed]
        if missing:
            stale += 1
            stale_prose += 1
            print(f"{path}: figures not printed by `{command}`: {', '.join(missing)}",
                  file=sys.stderr)
    if update and new != text:
        open(path, "w", encoding="utf-8").write(new)
        print(f"updated {path}", file=sys.stderr)

if checked == 0:
    sys.exit("no <!-- figures: … --> blocks found")
if stale_prose:
    sys.exit(f"{stale_prose} passages quote figures their command no longer prints: "
             "rewrite them by hand")
if stale and not update:
    sys.exit(f"{stale} of {checked} figure blocks differ from their command's output: "
             "fix the code, or run .ci/check-figures.sh --update and commit the new figures")
if not update:
    print(f"{checked} figure blocks match their commands' output", file=sys.stderr)
PY
