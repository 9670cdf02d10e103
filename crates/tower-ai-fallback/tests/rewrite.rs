//! The model rewrite splices bytes into a caller's request body: checked against
//! serde_json on generated bodies (nested `model` keys, escapes, odd whitespace, keys in
//! any order), so that it never changes anything but the top-level `model`.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tower_ai_fallback::rewrite_model;

/// A JSON string that may hold escapes, quotes, unicode and JSON-looking text.
fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => "[a-z0-9 ._-]{1,6}",
            1 => Just("\"".to_owned()),
            1 => Just("\\".to_owned()),
            1 => Just("é€😀".to_owned()),
            1 => Just("\n\t\u{1}".to_owned()),
            1 => Just(r#","model":"evil""#.to_owned()),
            1 => Just("{\"model\":".to_owned()),
        ],
        0..5,
    )
    .prop_map(|p| p.concat())
}

/// A JSON value up to two levels deep, where `model` keys may hide.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(
                (prop_oneof![Just("model".to_owned()), "[a-z]{1,5}"], inner),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request body: an object whose members are `members` (the top-level `model` among
/// them, maybe), written compact or pretty.
fn body(members: &Map<String, Value>, pretty: bool) -> String {
    let v = Value::Object(members.clone());
    if pretty {
        serde_json::to_string_pretty(&v).unwrap()
    } else {
        v.to_string()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn only_the_top_level_model_changes(
        members in proptest::collection::vec(("[a-z]{1,6}", value()), 0..6),
        model in proptest::option::of(prop_oneof![text().prop_map(Value::String), value()]),
        at in 0usize..6,
        new in text(),
        pretty in any::<bool>(),
    ) {
        let mut m: Vec<(String, Value)> = members.into_iter().filter(|(k, _)| k != "model").collect();
        if let Some(model) = &model {
            m.insert(at.min(m.len()), ("model".to_owned(), model.clone()));
        }
        let members: Map<String, Value> = m.into_iter().collect();
        let original = body(&members, pretty);
        let out = rewrite_model(original.as_bytes(), &new);
        match model {
            Some(Value::String(_)) => {
                let out = out.expect("a top-level string model is rewritten");
                let parsed: Value = serde_json::from_slice(&out).expect("still JSON");
                // Compared with the original as parsed (floats read back the same way).
                let mut want: Value = serde_json::from_str(&original).unwrap();
                want["model"] = Value::String(new.clone());
                prop_assert_eq!(parsed, want);
                // Every byte but the value's own is kept: rewriting back gives the original.
                let Value::String(old) = &members["model"] else { unreachable!() };
                let back = rewrite_model(&out, old).expect("rewritten again");
                prop_assert_eq!(std::str::from_utf8(&back).unwrap(), original.as_str());
            }
            // Absent, or not a string: left alone.
            _ => prop_assert!(out.is_none()),
        }
    }

    #[test]
    fn any_bytes_keep_everything_around_the_model(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        new in text(),
    ) {
        let out = rewrite_model(&bytes, &new);
        let span = tower_ai_core::top_level_value_span(&bytes, b"model");
        prop_assert_eq!(out.is_some(), span.is_some());
        if let (Some(out), Some(span)) = (out, span) {
            let lit = serde_json::to_vec(&new).unwrap();
            prop_assert_eq!(&out[..span.start], &bytes[..span.start]);
            prop_assert_eq!(&out[span.start..span.start + lit.len()], &lit[..]);
            prop_assert_eq!(&out[span.start + lit.len()..], &bytes[span.end..]);
        }
    }
}
