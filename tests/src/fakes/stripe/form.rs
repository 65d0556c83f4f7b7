//! Stripe's form encoding: `application/x-www-form-urlencoded` with bracketed keys
//! (`metadata[order_id]=9`, `line_items[0][price_data][currency]=usd`, `expand[]=x`),
//! parsed into a JSON tree so the fake can validate it like Stripe does.
//!
//! Owns only the decoding; it never judges what the parameters mean. Objects whose keys
//! are all indices become arrays, which must then run 0, 1, 2, … without gaps (Stripe
//! refuses sparse arrays). Every leaf stays a string, as on the wire; the fake converts
//! numbers where the API expects them.

use serde_json::{Map, Value};

/// Why a body could not be decoded; the message names the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormError(pub String);

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormError {}

/// Decodes a form body into a JSON object of nested objects, arrays and strings.
pub fn parse(body: &[u8]) -> Result<Value, FormError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| FormError(format!("invalid form body: {e}")))?;
    let mut root = Map::new();
    for (key, value) in pairs {
        let path = split_key(&key)?;
        insert(&mut root, &path, value, &key)?;
    }
    finish(Value::Object(root), "")
}

/// `a[b][0][]` → `["a", "b", "0", ""]` (an empty segment means "append").
fn split_key(key: &str) -> Result<Vec<&str>, FormError> {
    let bad = || FormError(format!("invalid parameter name {key:?}"));
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() || head.contains(']') {
        return Err(bad());
    }
    let mut path = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let close = inner.find(']').ok_or_else(bad)?;
        let segment = &inner[..close];
        if segment.contains('[') {
            return Err(bad());
        }
        path.push(segment);
        rest = &inner[close + 1..];
    }
    Ok(path)
}

fn insert(
    map: &mut Map<String, Value>,
    path: &[&str],
    value: String,
    key: &str,
) -> Result<(), FormError> {
    let conflict = || {
        FormError(format!(
            "parameter {key:?} conflicts with another parameter"
        ))
    };
    let (first, rest) = match path.split_first() {
        Some(split) => split,
        None => return Err(conflict()),
    };
    // `[]` appends: the next free index among what is already there.
    let name = if first.is_empty() {
        map.len().to_string()
    } else {
        (*first).to_owned()
    };
    if rest.is_empty() {
        if map.contains_key(&name) {
            return Err(FormError(format!(
                "parameter {key:?} was given more than once"
            )));
        }
        map.insert(name, Value::String(value));
        return Ok(());
    }
    let child = map.entry(name).or_insert_with(|| Value::Object(Map::new()));
    match child {
        Value::Object(inner) => insert(inner, rest, value, key),
        _ => Err(conflict()),
    }
}

/// Turns index-keyed objects into arrays, checking the indices are 0..n.
fn finish(value: Value, at: &str) -> Result<Value, FormError> {
    let Value::Object(map) = value else {
        return Ok(value);
    };
    let indexed = !map.is_empty()
        && map
            .keys()
            .all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
    if indexed {
        let mut items: Vec<(usize, Value)> = Vec::with_capacity(map.len());
        for (k, v) in map {
            let i: usize = k
                .parse()
                .map_err(|_| FormError(format!("invalid array index {at}[{k}]")))?;
            items.push((i, finish(v, &format!("{at}[{k}]"))?));
        }
        items.sort_by_key(|(i, _)| *i);
        if items
            .iter()
            .enumerate()
            .any(|(expected, (i, _))| *i != expected)
        {
            return Err(FormError(format!(
                "invalid array {}: indices must start at 0 and have no gaps",
                at.trim_start_matches('[')
            )));
        }
        return Ok(Value::Array(items.into_iter().map(|(_, v)| v).collect()));
    }
    let mut out = Map::new();
    for (k, v) in map {
        let child_at = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}[{k}]")
        };
        out.insert(k, finish(v, &child_at)?);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The Checkout example from PROTOCOLS.md §7 decodes into the nested shape.
    #[test]
    fn checkout_example() {
        let body = "mode=payment\
            &success_url=https%3A%2F%2Fapp.example.com%2Fok%3Fsession_id%3D%7BCHECKOUT_SESSION_ID%7D\
            &metadata[order_id]=ord_9\
            &line_items[0][price_data][currency]=usd\
            &line_items[0][price_data][product_data][name]=Call+credits\
            &line_items[0][price_data][unit_amount]=1999\
            &line_items[0][quantity]=1\
            &line_items[1][price]=price_1\
            &line_items[1][quantity]=2\
            &payment_intent_data%5Bmetadata%5D%5Border_id%5D=ord_9";
        assert_eq!(
            parse(body.as_bytes()).unwrap(),
            json!({
                "mode": "payment",
                "success_url": "https://app.example.com/ok?session_id={CHECKOUT_SESSION_ID}",
                "metadata": {"order_id": "ord_9"},
                "line_items": [
                    {"price_data": {"currency": "usd", "product_data": {"name": "Call credits"}, "unit_amount": "1999"}, "quantity": "1"},
                    {"price": "price_1", "quantity": "2"}
                ],
                "payment_intent_data": {"metadata": {"order_id": "ord_9"}}
            })
        );
    }

    /// `[]` appends; indices may arrive out of order; 10 sorts after 9.
    #[test]
    fn arrays() {
        assert_eq!(
            parse(b"expand[]=a&expand[]=b").unwrap(),
            json!({"expand": ["a", "b"]})
        );
        let body: String = (0..11).rev().map(|i| format!("x[{i}]={i}&")).collect();
        let parsed = parse(body.trim_end_matches('&').as_bytes()).unwrap();
        let expected: Vec<String> = (0..11).map(|i| i.to_string()).collect();
        assert_eq!(parsed, json!({"x": expected}));
    }

    /// Sparse arrays, conflicting shapes, duplicates and broken brackets are refused.
    #[test]
    fn refusals() {
        for body in [
            "line_items[1][price]=p",
            "a=1&a[b]=2",
            "a[b]=2&a=1",
            "a=1&a=2",
            "a[b=1",
            "a]=1",
            "[a]=1",
            "a[b]c=1",
            "a[[b]]=1",
        ] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }

    /// An empty body is an empty object.
    #[test]
    fn empty() {
        assert_eq!(parse(b"").unwrap(), json!({}));
    }
}
