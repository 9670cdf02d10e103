//! `keys::set_seed`: replicas seeded with one secret name a tenant's state alike (checked
//! across two processes: this test runs itself again as a child).

use tower_ai_core::keys::{set_seed, ApiKeyHash, ApiKeyHostModel, KeyFn};

fn labels() -> String {
    let req = http::Request::post("https://api.openai.com/v1/chat/completions")
        .header("authorization", "Bearer sk-tenant-a")
        .body(r#"{"model":"gpt-4o"}"#)
        .unwrap();
    format!(
        "{} {} {:?}",
        ApiKeyHash.label(&req),
        ApiKeyHostModel.label(&req),
        ApiKeyHash.key(&req)
    )
}

#[test]
fn two_processes_seeded_alike_derive_the_same_keys_and_labels() {
    set_seed(0x7e57_5eed).expect("the first key of this process");
    assert!(set_seed(1).is_err(), "a second seed is refused");
    let ours = labels();
    assert!(!ours.contains("sk-tenant-a"), "{ours}");
    if std::env::var_os("TOWER_AI_SEED_CHILD").is_some() {
        println!("labels={ours}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "two_processes_seeded_alike_derive_the_same_keys_and_labels",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOWER_AI_SEED_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let theirs = stdout
        .lines()
        .find_map(|l| l.split_once("labels=").map(|(_, labels)| labels))
        .unwrap_or_else(|| panic!("no labels from the child: {stdout}"));
    assert_eq!(theirs, ours);
}
