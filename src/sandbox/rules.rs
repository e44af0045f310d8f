//! What the fake Pleo accepts: the request rules of Pleo's OpenAPI files (types, formats,
//! enums, ranges, required fields) and the listing order it honours.
//!
//! The invariant: a request the files call invalid is refused with 400 and Pleo's
//! `{type, message}` body before it touches the fake's world, and nothing the fake answers
//! echoes a value these checks did not pass. Where the files are silent the rule here says
//! so, and docs/contract.md's "Contract decisions" lists it.

use serde_json::{Value, json};

use crate::edge::httpd::Response;
use crate::pleo::{ITEM_FAILURE_TYPES, ITEM_STATUSES, JOB_EVENTS, JOB_FAILURE_TYPES, JOB_STATUSES};

/// `PageOrder`.
pub const PAGE_ORDERS: &[&str] = &[
    "ASC",
    "ASC_NULLS_FIRST",
    "ASC_NULLS_LAST",
    "DESC",
    "DESC_NULLS_FIRST",
    "DESC_NULLS_LAST",
];

/// The largest page the fake serves (the files give no bound; a larger `limit` is served as
/// this many, and `currentRequestPagination.limit` says so).
pub const PAGE_MAX: usize = 1000;

pub fn error(status: u16, kind: &str, message: &str) -> Response {
    Response::json(status, &json!({"type": kind, "message": message}))
}

fn bad_parameter(message: String) -> Response {
    error(400, "INVALID_PARAMETER", &message)
}

fn bad_body(message: String) -> Response {
    error(400, "INVALID_BODY", &message)
}

pub use crate::wire::is_uuid;

/// A `date-time` (RFC 3339) as the files' `format` says.
pub fn is_date_time(s: &str) -> bool {
    crate::clock::Millis::parse_rfc3339(s).is_some()
}

/// Quoted for a message: at most 60 characters, so no request is echoed whole.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(60).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The query of one request, read by the rules of its operation.
pub struct Query<'a>(pub &'a [(String, String)]);

impl<'a> Query<'a> {
    fn values(&self, name: &str) -> Vec<&'a str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A parameter that is not an array: absent, or given once.
    pub fn single(&self, name: &str) -> Result<Option<&'a str>, Response> {
        match self.values(name).as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(v)),
            _ => Err(bad_parameter(format!("{name} is given more than once"))),
        }
    }

    /// A `format: uuid` parameter. `known` admits the readable ids a fixture may use.
    pub fn id(
        &self,
        name: &str,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Option<&'a str>, Response> {
        match self.single(name)? {
            Some(v) if !is_uuid(v) && !known(v) => Err(bad_parameter(format!(
                "{name} must be a UUID, not {}",
                shown(v)
            ))),
            other => Ok(other),
        }
    }

    /// A parameter whose value is one of `allowed`.
    pub fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<&'a str>, Response> {
        match self.single(name)? {
            Some(v) if !allowed.contains(&v) => Err(bad_parameter(format!(
                "{name} must be one of {}, not {}",
                allowed.join(", "),
                shown(v)
            ))),
            other => Ok(other),
        }
    }

    /// An array parameter (`style: form, explode: true`: the name repeated) of `allowed`.
    pub fn all_of(&self, name: &str, allowed: &[&str]) -> Result<Vec<&'a str>, Response> {
        let vs = self.values(name);
        if let Some(v) = vs.iter().find(|v| !allowed.contains(v)) {
            return Err(bad_parameter(format!(
                "each {name} must be one of {}, not {}",
                allowed.join(", "),
                shown(v)
            )));
        }
        Ok(vs)
    }

    /// An integer parameter in `[min, max]`.
    fn integer(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, Response> {
        let Some(v) = self.single(name)? else {
            return Ok(None);
        };
        match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(bad_parameter(format!(
                "{name} must be an integer from {min} to {max}, not {}",
                shown(v)
            ))),
        }
    }

    /// The paging and sorting parameters every Pleo listing takes. `sortable` names the keys
    /// this listing honours; `offset_min` is the file's `minimum` for `offset`, if any.
    pub fn page(&self, sortable: &[&str], offset_min: Option<i64>) -> Result<Page, Response> {
        let limit = self.integer("limit", 0, i64::from(i32::MAX))?;
        let offset = self.integer("offset", offset_min.unwrap_or(i64::MIN), i64::MAX)?;
        let cursor = |name: &str| -> Result<Option<String>, Response> {
            match self.single(name)? {
                Some(c)
                    if c.is_empty()
                        || !c
                            .bytes()
                            .all(|b| matches!(b, b'A'..=b'Z' | b'2'..=b'7' | b'=' | b'~')) =>
                {
                    Err(bad_parameter(format!(
                        "{name} must match ^[A-Z2-7=~]+$, not {}",
                        shown(c)
                    )))
                }
                other => Ok(other.map(str::to_owned)),
            }
        };
        let (after, before) = (cursor("after")?, cursor("before")?);
        let given = [after.is_some(), before.is_some(), offset.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(bad_parameter(
                "before, after and offset cannot be used together".into(),
            ));
        }
        let keys = self.values("sorting_keys");
        let orders = self.all_of("sorting_order", PAGE_ORDERS)?;
        if let Some(k) = keys.iter().find(|k| !sortable.contains(k)) {
            return Err(error(
                400,
                "INVALID_SORTING_KEY",
                &format!(
                    "this listing sorts by {}, not {}",
                    if sortable.is_empty() {
                        "nothing".to_owned()
                    } else {
                        sortable.join(", ")
                    },
                    shown(k)
                ),
            ));
        }
        if !orders.is_empty() && orders.len() != keys.len() {
            return Err(bad_parameter(format!(
                "sorting_order must give one order per sorting key ({} keys, {} orders)",
                keys.len(),
                orders.len()
            )));
        }
        let sort = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    k.to_string(),
                    orders.get(i).copied().unwrap_or("ASC").to_owned(),
                )
            })
            .collect();
        Ok(Page {
            limit: limit.map_or(100, |l| (l as usize).min(PAGE_MAX)),
            offset,
            after,
            before,
            sort,
        })
    }
}

/// The paging and sorting of one listing request, checked.
#[derive(Debug)]
pub struct Page {
    pub limit: usize,
    pub offset: Option<i64>,
    pub after: Option<String>,
    pub before: Option<String>,
    /// (key, order) pairs, each key one the listing honours.
    pub sort: Vec<(String, String)>,
}

impl Page {
    /// Sorts `items` stably by the requested keys. `field` gives an item's value for a key
    /// (`None` for null); values compare as text, so callers give sortable text (fixed-width
    /// timestamps, ids). Without sorting keys the order is left as it is: the fake promises
    /// no order, as Pleo's files promise none.
    pub fn sort<T>(&self, items: &mut [T], field: impl Fn(&T, &str) -> Option<String>) {
        if self.sort.is_empty() {
            return;
        }
        items.sort_by(|a, b| {
            for (key, order) in &self.sort {
                let (x, y) = (field(a, key), field(b, key));
                let desc = order.starts_with("DESC");
                // Nulls last for ASC and first for DESC unless told (as SQL databases do).
                let nulls_first = match order.as_str() {
                    "ASC_NULLS_FIRST" | "DESC_NULLS_FIRST" => true,
                    "ASC_NULLS_LAST" | "DESC_NULLS_LAST" => false,
                    _ => desc,
                };
                let ord = match (&x, &y) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, Some(_)) if nulls_first => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(_), None) if nulls_first => std::cmp::Ordering::Greater,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (Some(x), Some(y)) if desc => y.cmp(x),
                    (Some(x), Some(y)) => x.cmp(y),
                };
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
            }
            std::cmp::Ordering::Equal
        });
    }
}

/// A field's type in a request body, as the files declare it.
#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    Bool,
    /// `format: uuid`; the closure admits readable ids a fixture may use.
    Uuid,
    DateTime,
    OneOf(&'static [&'static str]),
    ArrayOfUuid,
    /// `Options`: an object whose `vendorBasedBookkeeping` is a boolean or null.
    Options,
}

/// One property of a request body.
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub nullable: bool,
}

const fn field(name: &'static str, ty: Ty, required: bool, nullable: bool) -> Field {
    Field {
        name,
        ty,
        required,
        nullable,
    }
}

/// `CreateExportJob`.
pub const CREATE_EXPORT_JOB: &[Field] = &[
    field("accountingEntryIds", Ty::ArrayOfUuid, true, false),
    field("companyId", Ty::Uuid, true, false),
    field("employeeId", Ty::Uuid, false, true),
    field("isInteractive", Ty::Bool, false, true),
    field("options", Ty::Options, false, true),
];

/// `CreateExportJobEvent`.
pub const CREATE_EXPORT_JOB_EVENT: &[Field] = &[
    field("event", Ty::OneOf(JOB_EVENTS), true, false),
    field("failureReason", Ty::Str, false, false),
    field(
        "failureReasonType",
        Ty::OneOf(JOB_FAILURE_TYPES),
        false,
        false,
    ),
    field("jobId", Ty::Uuid, true, false),
];

/// `UpdateExportJobItemV3`.
pub const UPDATE_EXPORT_JOB_ITEM: &[Field] = &[
    field("accountingEntryId", Ty::Uuid, true, false),
    field("exportedAt", Ty::DateTime, false, false),
    field("externalId", Ty::Str, false, false),
    field("externalUrl", Ty::Str, false, false),
    field("failureReason", Ty::Str, false, false),
    field(
        "failureReasonType",
        Ty::OneOf(ITEM_FAILURE_TYPES),
        false,
        false,
    ),
    field("status", Ty::OneOf(ITEM_STATUSES), true, false),
];

/// Parses a request body as JSON.
pub fn json_body(body: &[u8]) -> Result<Value, Response> {
    if body.is_empty() {
        return Err(bad_body("a JSON body is required".into()));
    }
    serde_json::from_slice(body).map_err(|e| bad_body(format!("body is not JSON: {e}")))
}

/// Checks `v` against the object `fields` describe. Properties the files do not name are
/// allowed (the schemas do not forbid them) and ignored. `at` names the object in messages.
pub fn check_object(
    v: &Value,
    fields: &[Field],
    at: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), Response> {
    let Some(obj) = v.as_object() else {
        return Err(bad_body(format!("{at} must be a JSON object")));
    };
    for f in fields {
        let path = if at == "body" {
            f.name.to_owned()
        } else {
            format!("{at}.{}", f.name)
        };
        let value = match obj.get(f.name) {
            None if f.required => return Err(bad_body(format!("{path} is required"))),
            None => continue,
            Some(Value::Null) if f.nullable && !f.required => continue,
            Some(Value::Null) => return Err(bad_body(format!("{path} must not be null"))),
            Some(v) => v,
        };
        check_value(value, f.ty, &path, known)?;
    }
    Ok(())
}

fn check_value(
    v: &Value,
    ty: Ty,
    path: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<(), Response> {
    let text = v.as_str();
    let fault = match ty {
        Ty::Str => text.is_none().then(|| "must be a string".to_owned()),
        Ty::Bool => (!v.is_boolean()).then(|| "must be true or false".to_owned()),
        Ty::Uuid => match text {
            Some(s) if is_uuid(s) || known(s) => None,
            Some(s) => Some(format!("must be a UUID, not {}", shown(s))),
            None => Some("must be a UUID string".to_owned()),
        },
        Ty::DateTime => match text {
            Some(s) if is_date_time(s) => None,
            Some(s) => Some(format!("must be an RFC 3339 date-time, not {}", shown(s))),
            None => Some("must be an RFC 3339 date-time string".to_owned()),
        },
        Ty::OneOf(allowed) => match text {
            Some(s) if allowed.contains(&s) => None,
            Some(s) => Some(format!(
                "must be one of {}, not {}",
                allowed.join(", "),
                shown(s)
            )),
            None => Some(format!("must be one of {}", allowed.join(", "))),
        },
        Ty::ArrayOfUuid => match v.as_array() {
            Some(a) => {
                for (i, e) in a.iter().enumerate() {
                    check_value(e, Ty::Uuid, &format!("{path}[{i}]"), known)?;
                }
                None
            }
            None => Some("must be an array of UUIDs".to_owned()),
        },
        Ty::Options => match v.as_object() {
            Some(o) => match o.get("vendorBasedBookkeeping") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => None,
                Some(_) => Some("vendorBasedBookkeeping must be true, false or null".to_owned()),
            },
            None => Some("must be an object".to_owned()),
        },
    };
    match fault {
        Some(f) => Err(bad_body(format!("{path} {f}"))),
        None => Ok(()),
    }
}

/// Checks a `PUT .../items` body: an array of `UpdateExportJobItemV3`.
pub fn check_item_updates(v: &Value, known: &dyn Fn(&str) -> bool) -> Result<(), Response> {
    let Some(updates) = v.as_array() else {
        return Err(bad_body("body must be a JSON array".into()));
    };
    for (i, u) in updates.iter().enumerate() {
        check_object(u, UPDATE_EXPORT_JOB_ITEM, &format!("[{i}]"), known)?;
    }
    Ok(())
}

/// A job status filter: `statuses` (repeated) of `ExportJobStatus`.
pub fn job_statuses<'a>(q: &Query<'a>) -> Result<Vec<&'a str>, Response> {
    q.all_of("statuses", JOB_STATUSES)
}

/// An item status filter: `status` of `ExportJobItemStatus`.
pub fn item_status<'a>(q: &Query<'a>) -> Result<Option<&'a str>, Response> {
    q.one_of("status", ITEM_STATUSES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn uuids_in_canonical_form_only() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_uuid("0F8FAD5B-D9CB-469F-A165-70867728950E"));
        assert!(!is_uuid("0f8fad5bd9cb469fa16570867728950e"));
        assert!(!is_uuid("0f8fad5b-d9cb-469f-a165-70867728950"));
        assert!(!is_uuid("aaaaaaaa-0000-4000-8000-00000000zz99"));
        assert!(!is_uuid(""));
    }

    #[test]
    fn page_parameters_are_checked_against_their_ranges() {
        let page = |pairs: &[(&str, &str)]| Query(&q(pairs)).page(&["createdAt"], Some(0));
        assert_eq!(page(&[]).unwrap().limit, 100);
        assert_eq!(page(&[("limit", "0")]).unwrap().limit, 0);
        assert_eq!(page(&[("limit", "5000")]).unwrap().limit, PAGE_MAX);
        for bad in [
            vec![("limit", "-1")],
            vec![("limit", "2147483648")],
            vec![("limit", "ten")],
            vec![("limit", "1"), ("limit", "2")],
            vec![("offset", "-1")],
            vec![("after", "abc")],
            vec![("after", "")],
            vec![("after", "AAAA"), ("offset", "0")],
            vec![("sorting_keys", "status")],
            vec![("sorting_order", "ASC")],
            vec![("sorting_keys", "createdAt"), ("sorting_order", "UP")],
        ] {
            let r = page(&bad).expect_err(&format!("{bad:?} must be refused"));
            assert_eq!(r.status, 400, "{bad:?}");
        }
        let p = page(&[("sorting_keys", "createdAt"), ("sorting_order", "DESC")]).unwrap();
        assert_eq!(p.sort, vec![("createdAt".to_owned(), "DESC".to_owned())]);
        // Without a minimum in the file, a negative offset is the file's to allow.
        assert!(Query(&q(&[("offset", "-3")])).page(&[], None).is_ok());
    }

    #[test]
    fn sorting_honours_order_and_nulls() {
        let p = Query(&q(&[
            ("sorting_keys", "k"),
            ("sorting_order", "ASC_NULLS_FIRST"),
        ]))
        .page(&["k"], None)
        .unwrap();
        let mut v = vec![Some("b"), None, Some("a")];
        p.sort(&mut v, |x, _| x.map(str::to_owned));
        assert_eq!(v, vec![None, Some("a"), Some("b")]);
        let p = Query(&q(&[("sorting_keys", "k"), ("sorting_order", "DESC")]))
            .page(&["k"], None)
            .unwrap();
        p.sort(&mut v, |x, _| x.map(str::to_owned));
        assert_eq!(v, vec![None, Some("b"), Some("a")]);
    }

    #[test]
    fn bodies_are_checked_field_by_field() {
        let none = |_: &str| false;
        let ok = json!({"accountingEntryIds": ["0f8fad5b-d9cb-469f-a165-70867728950e"],
                        "companyId": "0f8fad5b-d9cb-469f-a165-70867728950e",
                        "employeeId": null, "isInteractive": null, "options": null});
        assert!(check_object(&ok, CREATE_EXPORT_JOB, "body", &none).is_ok());
        for bad in [
            json!({"accountingEntryIds": [], "companyId": ""}),
            json!({"accountingEntryIds": [[]], "companyId": "0f8fad5b-d9cb-469f-a165-70867728950e"}),
            json!({"companyId": "0f8fad5b-d9cb-469f-a165-70867728950e"}),
            json!({"accountingEntryIds": [], "companyId": "0f8fad5b-d9cb-469f-a165-70867728950e", "employeeId": "AAA"}),
            json!({"accountingEntryIds": [], "companyId": "0f8fad5b-d9cb-469f-a165-70867728950e", "options": {"vendorBasedBookkeeping": {}}}),
            json!([]),
        ] {
            let r =
                check_object(&bad, CREATE_EXPORT_JOB, "body", &none).expect_err(&bad.to_string());
            assert_eq!(r.status, 400);
        }
        let item = |status: &str, reason: &str| json!([{"accountingEntryId": "0f8fad5b-d9cb-469f-a165-70867728950e", "status": status, "failureReasonType": reason}]);
        assert!(check_item_updates(&item("failed", "tag_unknown"), &none).is_ok());
        assert!(check_item_updates(&item("done", "tag_unknown"), &none).is_err());
        assert!(check_item_updates(&item("failed", "gremlins"), &none).is_err());
        // A readable id a fixture holds is taken back.
        let known = |s: &str| s == "e-1";
        let fixture_item = json!([{"accountingEntryId": "e-1", "status": "successful"}]);
        assert!(check_item_updates(&fixture_item, &known).is_ok());
        assert!(check_item_updates(&fixture_item, &none).is_err());
    }
}
