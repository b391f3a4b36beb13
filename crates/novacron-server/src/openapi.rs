//! The published API document: what every operation can answer.
//!
//! Handlers declare the answers that are theirs (201, 409 on a conflict of
//! state, 502 from an agent). The answers that come from the layers every
//! request passes through are declared here, from the same facts those layers
//! act on, so a client generated from the document handles ordinary errors:
//! the token check (401, 429), the authorization (403), the JSON body (400,
//! 408, 413, 415, 422), the query string (400, 422), an object named in the path
//! (404), a fixed route that shadows a name (405), the store's
//! compare-and-swap (409), a watch from a revision the store no longer keeps
//! (410), and a fault (500). Creates are linked to the operations on what
//! they made.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, ResponseBuilder};

/// Why each layer answers with a status, as the document says it.
const REASONS: &[(u16, &str)] = &[
    (
        400,
        "Malformed request: the body is not JSON, or a query parameter has the wrong type",
    ),
    (401, "No token, or an invalid, expired or revoked token or certificate"),
    (403, "The caller's role or project does not allow this"),
    (
        404,
        "No object of that name (objects of other projects count as absent)",
    ),
    (
        405,
        "The name is a fixed route of its own (e.g. `join`), which does not take this method",
    ),
    (
        409,
        "The object changed meanwhile, exists already, or its state forbids this",
    ),
    (
        410,
        "The watch starts at a revision the store no longer keeps: list again",
    ),
    (408, "The request body did not arrive in time"),
    (413, "The request body is over the size limit"),
    (415, "The request body is not application/json"),
    (
        422,
        "The request is well-formed but a field is invalid; `field` names it",
    ),
    (429, "Rate limit exceeded; Retry-After says when to try again"),
    (500, "Internal error; the server log has the cause"),
];

/// Adds to every operation the answers of the layers it passes through,
/// keeping what the handler declared itself.
pub fn declare_layer_responses(doc: &mut OpenApi) {
    let paths: Vec<String> = doc.paths.paths.keys().cloned().collect();
    for (path, item) in doc.paths.paths.iter_mut() {
        // `/v1/nodes/{name}` with the name `join` is the route `/v1/nodes/join`,
        // which may not take this method: the router answers 405.
        let shadowed = paths.iter().any(|other| shadows(other, path));
        let ops = [
            ("GET", &mut item.get),
            ("PUT", &mut item.put),
            ("POST", &mut item.post),
            ("DELETE", &mut item.delete),
            ("PATCH", &mut item.patch),
        ];
        for (method, op) in ops {
            if let Some(op) = op.as_mut() {
                for status in layer_statuses(path, method, op) {
                    add_error(op, status);
                }
                if shadowed {
                    add_error(op, 405);
                }
            }
        }
    }
}

/// Whether the fixed path `route` is `template` with one of its parameters
/// given as a literal: a request for that value reaches `route` instead.
fn shadows(route: &str, template: &str) -> bool {
    let (r, t): (Vec<&str>, Vec<&str>) = (route.split('/').collect(), template.split('/').collect());
    r.len() == t.len()
        && r != t
        && r.iter()
            .zip(&t)
            .all(|(a, b)| a == b || (b.starts_with('{') && !a.starts_with('{')))
}

/// The statuses the shared layers can give this operation.
fn layer_statuses(path: &str, method: &str, op: &Operation) -> Vec<u16> {
    // `security(())`: an empty requirement, no token needed (login).
    let public = op
        .security
        .as_ref()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|r| *r == SecurityRequirement::default()));
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_query = params.iter().any(|p| p.parameter_in == ParameterIn::Query);
    let watches = params.iter().any(|p| p.name == "watch");
    let mut out = vec![500];
    if public {
        // Login: no token, but a throttle on failed attempts.
        out.push(429);
    } else {
        out.extend([401, 403, 429]);
    }
    if op.request_body.is_some() {
        out.extend([400, 408, 413, 415, 422]);
    }
    if has_query {
        out.extend([400, 422]);
    }
    if path.contains('{') {
        out.push(404);
    }
    if method != "GET" {
        out.push(409);
    }
    if watches {
        out.push(410);
    }
    out
}

fn add_error(op: &mut Operation, status: u16) {
    let key = status.to_string();
    if op.responses.responses.contains_key(&key) {
        return;
    }
    let reason = REASONS.iter().find(|(s, _)| *s == status).map_or("Error", |(_, r)| *r);
    let response = ResponseBuilder::new()
        .description(reason)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build();
    op.responses.responses.insert(key, RefOr::T(response));
}

/// Links from each create (`POST /v1/KIND` answering 201) to the operations
/// on what it made (`/v1/KIND/{name}...`), with the name taken from the
/// answer: a client (and a fuzzer) learns how to reach an object it created.
/// Works on the JSON form: utoipa 5.5 writes a link's `operationId` in snake case.
pub fn link_creates_to_their_objects(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    // (operation id, method, path) of every operation.
    let mut operations: Vec<(String, String, String)> = Vec::new();
    for (path, item) in paths.iter() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if let Some(id) = op.get("operationId").and_then(|i| i.as_str()) {
                operations.push((id.to_string(), method.clone(), path.clone()));
            }
        }
    }
    for (path, item) in paths.iter_mut() {
        let Some(create) = item.get_mut("post") else { continue };
        // A token comes back with its secret, the object one level down.
        let name_at = if create.get("operationId").and_then(|i| i.as_str()) == Some("create_token") {
            "$response.body#/token/metadata/name"
        } else {
            "$response.body#/metadata/name"
        };
        let Some(created) = create.pointer_mut("/responses/201").and_then(|r| r.as_object_mut()) else {
            continue;
        };
        let prefix = format!("{path}/{{name}}");
        let mut links = serde_json::Map::new();
        for (id, method, target) in &operations {
            // Only operations that need nothing but the name.
            if target == &prefix || (target.starts_with(&format!("{prefix}/")) && !target[prefix.len()..].contains('{'))
            {
                links.insert(
                    id.clone(),
                    serde_json::json!({
                        "operationId": id,
                        "parameters": {"path.name": name_at},
                        "description": format!("{} {target} on the object just created", method.to_uppercase()),
                    }),
                );
            }
        }
        if !links.is_empty() {
            created.insert("links".into(), serde_json::Value::Object(links));
        }
    }
}

/// Gives each list operation's `field_selector` the pattern of what it
/// accepts: terms on the kind's selectable fields only.
pub fn constrain_field_selectors(doc: &mut serde_json::Value, selectable: &[(&str, &[&str])]) {
    for (path, fields) in selectable {
        let Some(params) = doc
            .pointer_mut(&format!("/paths/{}/get/parameters", path.replace('/', "~1")))
            .and_then(|p| p.as_array_mut())
        else {
            continue;
        };
        let names = fields
            .iter()
            .map(|f| f.replace('.', "\\."))
            .collect::<Vec<_>>()
            .join("|");
        let term = format!("({names})(=|==|!=)[A-Za-z0-9._:-]*");
        for p in params.iter_mut().filter(|p| p["name"] == "field_selector") {
            p["schema"]["pattern"] = serde_json::Value::String(format!("^{term}(,{term})*$"));
        }
    }
}
