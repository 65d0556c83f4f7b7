//! The OpenAPI 3.1 document of the Worker's HTTP API (`workers/core/openapi.json`), served
//! at `GET /openapi.json` and used by the integration tests to check real responses.
//!
//! The document is written by hand; the tests here hold it to the route table
//! ([`super::routes::ROUTES`]) in both directions.

/// The document, as checked in.
pub const DOCUMENT: &str = include_str!("../../openapi.json");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::routes::{Access, ROUTES};
    use serde_json::Value;
    use std::collections::BTreeSet;

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// A route-table path in OpenAPI's spelling: `:id` is `{id}`.
    fn templated(path: &str) -> String {
        path.split('/')
            .map(|s| match s.strip_prefix(':') {
                Some(name) => format!("{{{name}}}"),
                None => s.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Every operation of the document: method, path and the operation object.
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut ops = Vec::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                assert!(METHODS.contains(&method.as_str()), "{method} {path}");
                ops.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
        ops
    }

    /// `#/components/…` references resolved against the document.
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => doc
                .pointer(r.strip_prefix('#').expect("a local $ref"))
                .unwrap_or_else(|| panic!("{r} names nothing")),
            None => v,
        }
    }

    /// The route table and the document name the same operations, in both directions.
    #[test]
    fn the_document_and_the_route_table_agree() {
        let doc = document();
        let documented: BTreeSet<(String, String)> = operations(&doc)
            .into_iter()
            .map(|(m, p, _)| (m, p))
            .collect();
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.as_str().to_owned(), templated(r.path)))
            .collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes missing from openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
        );
    }

    /// Each operation's security is its route's `Access`.
    #[test]
    fn security_follows_access() {
        let doc = document();
        for route in ROUTES {
            let path = templated(route.path);
            let op = &doc["paths"][&path][route.method.as_str().to_lowercase()];
            let schemes: BTreeSet<&str> = op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{path}: security"))
                .iter()
                .flat_map(|req| req.as_object().expect("requirement").keys())
                .map(String::as_str)
                .collect();
            let want: &[&str] = match route.access {
                // Anyone, though some routes read a bearer token when one is sent.
                Access::Anyone => &[],
                Access::User | Access::Admin => &["bearerAuth"],
                Access::Twilio => &["twilioSignature"],
                Access::Stripe => &["stripeSignature"],
                Access::Relay => &["relaySecret"],
            };
            if route.access == Access::Anyone {
                assert!(schemes.is_empty(), "{path}: {schemes:?}");
            } else {
                assert_eq!(schemes, want.iter().copied().collect(), "{path}");
            }
            for scheme in schemes {
                assert!(
                    doc["components"]["securitySchemes"][scheme].is_object(),
                    "{scheme} is not in components.securitySchemes"
                );
            }
        }
    }

    /// Every operation has a unique operationId, a 2xx answer, its path parameters, and
    /// error answers in the shared error schema (`components.schemas.Error`).
    #[test]
    fn every_operation_is_complete() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["schemas"]["Error"].is_object());
        let error_ref = "#/components/schemas/Error";
        let mut ids = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let name = format!("{method} {path}");
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: operationId"));
            assert!(ids.insert(id.to_owned()), "{name}: operationId {id} twice");
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{name}"));
            assert!(
                responses
                    .keys()
                    .any(|s| s.starts_with('1') || s.starts_with('2')),
                "{name}: no success response"
            );
            let mut errors = 0;
            for (status, resp) in responses {
                assert!(status.parse::<u16>().is_ok(), "{name}: status {status}");
                let schema = &resp["content"]["application/json"]["schema"];
                // `/health`'s 503 is its report, not an error.
                if status.as_str() < "400" || (path == "/health" && status == "503") {
                    continue;
                }
                errors += 1;
                let base = schema["allOf"][0]["$ref"]
                    .as_str()
                    .or(schema["$ref"].as_str());
                assert_eq!(
                    base,
                    Some(error_ref),
                    "{name} {status}: not the error schema"
                );
            }
            // Only the two routes answered before configuration is read cannot fail.
            if !["/health", "/openapi.json"].contains(&path.as_str()) {
                assert!(errors > 0, "{name}: no error responses");
            }
            let declared: BTreeSet<String> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| resolve(&doc, p))
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().expect("parameter name").to_owned())
                        .collect()
                })
                .unwrap_or_default();
            let in_path: BTreeSet<String> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_owned)
                .collect();
            assert_eq!(declared, in_path, "{name}: path parameters");
        }
    }

    /// Route-table parameters are spelled as OpenAPI templates.
    #[test]
    fn templated_paths_match_openapi_spelling() {
        assert_eq!(
            templated("/api/personas/:id/memory"),
            "/api/personas/{id}/memory"
        );
        assert_eq!(templated("/health"), "/health");
    }
}
