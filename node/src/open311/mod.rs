//! Open311 GeoReport v2 under `/open311/v2`: a quarter node takes service
//! requests as concerns of its quarter; the centre serves the same reads,
//! over every quarter, and refuses posts. `docs/open311.md` lists what is
//! supported and how it maps onto concerns.
//!
//! # Layout
//! - [`config`]: the service list and discovery settings (`open311.toml`).
//! - [`keys`]: API keys in the local-only store, and their JSON API routes.
//! - [`render`]: JSON and XML answers, W3C timestamps, the spec's errors.

pub mod config;
pub mod keys;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use iq_protocol::datadir::Role;
use iq_protocol::replicator::Handle;
use iq_protocol::schema::{self, Concern};
use iq_protocol::{DocId, QuarterSlug};
use serde::Serialize;

use crate::api::{ConcernView, Reporter, concerns_in, now_ms};
use config::Open311Config;
use render::{Format, Open311Error, respond, w3c};

/// The spec's default window for request searches, and its row cap.
const DEFAULT_DAYS: i64 = 90;
const MAX_ROWS: usize = 1000;
const DAY_MS: i64 = 86_400_000;
const TOKEN_PREFIX: &str = "open311/token/";

/// What every Open311 handler needs.
#[derive(Debug, Clone)]
struct Ctx {
    handle: Handle,
    config: Arc<Open311Config>,
}

/// The Open311 routes of a node (both kinds; the handlers ask the node's
/// role). Merged into the API router by the daemon.
pub fn router(handle: Handle, config: Open311Config) -> Router {
    Router::new()
        .route("/open311/v2/{file}", get(get_top).post(post_top))
        .route("/open311/v2/services/{file}", get(service_definition))
        .route("/open311/v2/requests/{file}", get(one_request))
        .route("/open311/v2/tokens/{file}", get(token))
        .with_state(Ctx {
            handle,
            config: Arc::new(config),
        })
}

type Params = Vec<(String, String)>;

fn parse_params(query: Option<&str>, format: Format) -> Result<Params, Open311Error> {
    serde_urlencoded::from_str(query.unwrap_or_default()).map_err(|e| {
        Open311Error::bad_request(format!("the query string is not URL-encoded: {e}"))
            .in_format(format)
    })
}

/// The last value of `name`, trimmed, if not empty.
fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A comma list parameter (`a,b`), or none.
fn list_param(params: &Params, name: &str) -> Option<Vec<String>> {
    param(params, name).map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// Which quarters a request reads: a quarter node only its own (and a
/// `jurisdiction_id`, if given, must name it); the centre every quarter,
/// or the one `jurisdiction_id` names.
#[derive(Debug, Clone)]
struct Scope {
    role: Role,
    /// `None`: every quarter (centre without `jurisdiction_id`).
    quarter: Option<QuarterSlug>,
}

async fn scope(ctx: &Ctx, params: &Params, format: Format) -> Result<Scope, Open311Error> {
    let wanted = param(params, "jurisdiction_id").map(str::to_owned);
    let (role, own, known) = ctx
        .handle
        .read(|view| {
            let known: Vec<QuarterSlug> = view
                .engine
                .docs()
                .filter(|(id, _)| view.engine.accepts(id))
                .filter_map(|(id, _)| id.quarter_slug().cloned())
                .collect();
            (view.role, view.own_doc.clone(), known)
        })
        .await
        .map_err(|e| Open311Error::from(e).in_format(format))?;
    let unknown = |j: &str, known: String| {
        Open311Error::not_found(format!(
            "jurisdiction_id '{j}' is not served here; this endpoint serves {known}"
        ))
        .in_format(format)
    };
    match (role, own) {
        (Role::Quarter, DocId::Quarter(own)) => match wanted {
            Some(j) if j != own.as_str() => Err(unknown(&j, format!("'{own}'"))),
            _ => Ok(Scope {
                role,
                quarter: Some(own),
            }),
        },
        _ => match wanted {
            None => Ok(Scope {
                role,
                quarter: None,
            }),
            Some(j) => match known.into_iter().find(|q| q.as_str() == j) {
                Some(q) => Ok(Scope {
                    role,
                    quarter: Some(q),
                }),
                None => Err(unknown(&j, "the quarters on the city's roster".into())),
            },
        },
    }
}

/// `GET discovery|services|requests .json|.xml`.
async fn get_top(
    State(ctx): State<Ctx>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Open311Error> {
    let (stem, format) = Format::split(&file)?;
    let params = parse_params(query.as_deref(), format)?;
    match stem {
        "discovery" => Ok(discovery(&ctx.config, &headers, format)),
        "services" => {
            scope(&ctx, &params, format).await?;
            Ok(services(&ctx.config, format))
        }
        "requests" => requests(&ctx, &params, format).await,
        _ => Err(unknown_path(&file, format)),
    }
}

fn unknown_path(file: &str, format: Format) -> Open311Error {
    Open311Error::not_found(format!(
        "no Open311 resource '{file}': there are discovery, services, requests and tokens"
    ))
    .in_format(format)
}

#[derive(Debug, Serialize)]
struct Discovery {
    changeset: String,
    contact: Option<String>,
    key_service: Option<String>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Serialize)]
struct Endpoint {
    specification: &'static str,
    url: String,
    changeset: String,
    #[serde(rename = "type")]
    kind: &'static str,
    formats: [&'static str; 2],
}

fn discovery(config: &Open311Config, headers: &HeaderMap, format: Format) -> Response {
    let url = config.base_url.clone().unwrap_or_else(|| {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        format!("http://{host}/open311/v2")
    });
    let changeset = render::parse_w3c(&config.changeset)
        .map(w3c)
        .unwrap_or_else(|| config.changeset.clone());
    let body = Discovery {
        changeset: changeset.clone(),
        contact: config.contact.clone(),
        key_service: config.key_service.clone(),
        endpoints: vec![Endpoint {
            specification: "http://wiki.open311.org/GeoReport_v2",
            url,
            changeset,
            kind: "production",
            formats: ["text/xml", "application/json"],
        }],
    };
    respond(StatusCode::OK, format, "discovery", &body)
}

#[derive(Debug, Serialize)]
struct ServiceOut<'a> {
    service_code: &'a str,
    service_name: &'a str,
    description: &'a str,
    metadata: bool,
    #[serde(rename = "type")]
    kind: &'static str,
    keywords: String,
    group: Option<&'a str>,
}

fn services(config: &Open311Config, format: Format) -> Response {
    let list: Vec<ServiceOut<'_>> = config
        .services
        .iter()
        .map(|s| ServiceOut {
            service_code: &s.code,
            service_name: &s.name,
            description: &s.description,
            metadata: !s.attributes.is_empty(),
            kind: "realtime",
            keywords: s.keywords.join(", "),
            group: s.group.as_deref(),
        })
        .collect();
    respond(StatusCode::OK, format, "services", &list)
}

#[derive(Debug, Serialize)]
struct ServiceDefinition<'a> {
    service_code: &'a str,
    attributes: Vec<&'a config::Attribute>,
}

/// `GET services/{service_code}.json|.xml`: the service's attributes.
async fn service_definition(
    State(ctx): State<Ctx>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Open311Error> {
    let (code, format) = Format::split(&file)?;
    let params = parse_params(query.as_deref(), format)?;
    scope(&ctx, &params, format).await?;
    let service = ctx.config.service(code).ok_or_else(|| {
        Open311Error::not_found(format!(
            "no service '{code}'; the services are {}",
            ctx.config.codes()
        ))
        .in_format(format)
    })?;
    let mut attributes: Vec<&config::Attribute> = service.attributes.iter().collect();
    attributes.sort_by_key(|a| a.order);
    Ok(respond(
        StatusCode::OK,
        format,
        "service_definition",
        &ServiceDefinition {
            service_code: &service.code,
            attributes,
        },
    ))
}

/// A service request as GeoReport v2 shows it, plus the cheap extensions
/// (`detailed_status`, `jurisdiction_id`, `attributes`).
#[derive(Debug, Serialize)]
struct RequestOut {
    service_request_id: String,
    status: String,
    status_notes: Option<String>,
    service_name: String,
    service_code: String,
    description: String,
    agency_responsible: Option<String>,
    service_notice: Option<String>,
    requested_datetime: String,
    updated_datetime: String,
    expected_datetime: Option<String>,
    address: Option<String>,
    address_id: Option<String>,
    zipcode: Option<String>,
    lat: Option<f64>,
    long: Option<f64>,
    media_url: Option<String>,
    /// `RECEIVED`, `IN_PROCESS`, `PROCESSED` or `REJECTED`.
    detailed_status: Option<String>,
    /// The quarter that holds the request.
    jurisdiction_id: String,
    /// The answers given to the service's attributes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    attributes: Vec<AnswerOut>,
}

#[derive(Debug, Serialize)]
struct AnswerOut {
    code: String,
    values: Vec<String>,
}

/// Unix ms of the last change a reader can see: creation, a status note or
/// the centre's response.
fn updated_ms(c: &ConcernView) -> i64 {
    c.notes
        .iter()
        .map(|n| n.at_ms)
        .chain(std::iter::once(c.created_ms))
        .max()
        .unwrap_or(c.created_ms)
}

fn request_out(c: ConcernView, config: &Open311Config) -> RequestOut {
    let service = config.service(&c.category);
    let status_notes = c
        .notes
        .iter()
        .filter(|n| !n.note.trim().is_empty() || n.by == "centre")
        .max_by_key(|n| n.at_ms)
        .map(|n| {
            if n.by == "centre" {
                if n.note.trim().is_empty() {
                    format!("Stadtverwaltung: {}", n.status)
                } else {
                    format!("Stadtverwaltung: {}: {}", n.status, n.note)
                }
            } else {
                n.note.clone()
            }
        });
    RequestOut {
        updated_datetime: w3c(updated_ms(&c)),
        service_name: service
            .map(|s| s.name.clone())
            .unwrap_or_else(|| c.category.clone()),
        agency_responsible: c
            .agency
            .clone()
            .or_else(|| service.and_then(|s| s.agency.clone())),
        service_request_id: c.id,
        status: c.status,
        status_notes,
        service_code: c.category,
        description: c.description,
        service_notice: None,
        requested_datetime: w3c(c.created_ms),
        expected_datetime: None,
        address: c.address,
        address_id: None,
        zipcode: None,
        lat: c.lat,
        long: c.long,
        media_url: c.media_url,
        detailed_status: c.detailed_status.map(|s| s.to_uppercase()),
        jurisdiction_id: c.quarter,
        attributes: c
            .attributes
            .into_iter()
            .map(|(code, values)| AnswerOut { code, values })
            .collect(),
    }
}

/// The filters of `GET requests`, checked.
#[derive(Debug, Clone, Default)]
struct Filters {
    ids: Option<Vec<String>>,
    codes: Option<Vec<String>>,
    statuses: Option<Vec<String>>,
    detailed: Option<Vec<String>>,
    start: Option<i64>,
    end: Option<i64>,
    updated_after: Option<i64>,
    updated_before: Option<i64>,
    page: usize,
    page_size: usize,
}

impl Filters {
    fn parse(params: &Params, config: &Open311Config, now: i64) -> Result<Self, Open311Error> {
        let time = |name: &str| -> Result<Option<i64>, Open311Error> {
            param(params, name)
                .map(|v| {
                    render::parse_w3c(v).ok_or_else(|| {
                        Open311Error::bad_request(format!(
                            "{name} {v:?} is not a W3C timestamp such as 2026-01-31T00:00:00+01:00"
                        ))
                    })
                })
                .transpose()
        };
        let number = |name: &str, default: usize, max: usize| -> Result<usize, Open311Error> {
            match param(params, name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        Open311Error::bad_request(format!(
                            "{name} {v:?} must be a whole number from 1 to {max}"
                        ))
                    }),
            }
        };
        let mut f = Filters {
            ids: list_param(params, "service_request_id"),
            codes: list_param(params, "service_code"),
            statuses: list_param(params, "status"),
            detailed: list_param(params, "detailed_status"),
            start: time("start_date")?,
            end: time("end_date")?,
            updated_after: time("updated_after")?,
            updated_before: time("updated_before")?,
            page: number("page", 1, usize::MAX)?,
            page_size: number("page_size", MAX_ROWS, MAX_ROWS)?,
        };
        if f.ids.as_ref().is_some_and(|ids| ids.len() > MAX_ROWS) {
            return Err(Open311Error::bad_request(format!(
                "service_request_id lists at most {MAX_ROWS} ids"
            )));
        }
        if let Some(statuses) = &f.statuses
            && let Some(bad) = statuses.iter().find(|s| *s != "open" && *s != "closed")
        {
            return Err(Open311Error::bad_request(format!(
                "status '{bad}' is neither open nor closed"
            )));
        }
        if let Some(detailed) = &mut f.detailed {
            for d in detailed.iter_mut() {
                *d = d.to_uppercase();
                if !schema::DETAILED_STATUSES
                    .iter()
                    .any(|s| s.to_uppercase() == *d)
                {
                    return Err(Open311Error::bad_request(format!(
                        "detailed_status '{d}' is not one of RECEIVED, IN_PROCESS, PROCESSED, REJECTED"
                    )));
                }
            }
        }
        if let Some(codes) = &f.codes
            && let Some(bad) = codes.iter().find(|c| config.service(c).is_none())
        {
            return Err(Open311Error::not_found(format!(
                "no service '{bad}'; the services are {}",
                config.codes()
            )));
        }
        // The spec's window: at most 90 days of requested_datetime, the most
        // recent 90 when no dates are given. Searches by update time (an
        // extension for apps that sync) are not cut to a window.
        match (f.start, f.end) {
            (Some(s), Some(e)) if s > e => {
                return Err(Open311Error::bad_request(
                    "start_date is after end_date: swap them",
                ));
            }
            (Some(s), Some(e)) if e - s > DEFAULT_DAYS * DAY_MS => {
                return Err(Open311Error::bad_request(
                    "start_date and end_date may be at most 90 days apart; page through shorter ranges",
                ));
            }
            (Some(s), None) => f.end = Some(s + DEFAULT_DAYS * DAY_MS),
            (None, Some(e)) => f.start = Some(e - DEFAULT_DAYS * DAY_MS),
            (None, None) if f.updated_after.is_none() && f.updated_before.is_none() => {
                f.start = Some(now - DEFAULT_DAYS * DAY_MS);
            }
            _ => {}
        }
        Ok(f)
    }

    fn keep(&self, c: &ConcernView) -> bool {
        if let Some(ids) = &self.ids {
            // A list of ids overrides every other filter (the spec).
            return ids.contains(&c.id);
        }
        let updated = updated_ms(c);
        self.codes.as_ref().is_none_or(|v| v.contains(&c.category))
            && self.statuses.as_ref().is_none_or(|v| v.contains(&c.status))
            && self.detailed.as_ref().is_none_or(|v| {
                c.detailed_status
                    .as_ref()
                    .is_some_and(|d| v.contains(&d.to_uppercase()))
            })
            && self.start.is_none_or(|s| c.created_ms >= s)
            && self.end.is_none_or(|e| c.created_ms <= e)
            && self.updated_after.is_none_or(|t| updated > t)
            && self.updated_before.is_none_or(|t| updated < t)
    }
}

async fn requests(ctx: &Ctx, params: &Params, format: Format) -> Result<Response, Open311Error> {
    let scope = scope(ctx, params, format).await?;
    let filters = Filters::parse(params, &ctx.config, now_ms()).map_err(|e| e.in_format(format))?;
    let config = ctx.config.clone();
    let list = ctx
        .handle
        .read(move |view| {
            let matching = concerns_in(&view, scope.quarter.as_ref())
                .into_iter()
                .filter(|c| filters.keep(c));
            let skip = (filters.page - 1).saturating_mul(filters.page_size);
            matching
                .skip(skip)
                .take(filters.page_size)
                .map(|c| request_out(c, &config))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Open311Error::from(e).in_format(format))?;
    Ok(respond(StatusCode::OK, format, "service_requests", &list))
}

/// `GET requests/{id}.json|.xml`: one request, as a list of one.
async fn one_request(
    State(ctx): State<Ctx>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Open311Error> {
    let (id, format) = Format::split(&file)?;
    let params = parse_params(query.as_deref(), format)?;
    let scope = scope(&ctx, &params, format).await?;
    let id = id.to_string();
    let config = ctx.config.clone();
    let found = ctx
        .handle
        .read(move |view| {
            concerns_in(&view, scope.quarter.as_ref())
                .into_iter()
                .find(|c| c.id == id)
                .map(|c| request_out(c, &config))
                .ok_or(id)
        })
        .await
        .map_err(|e| Open311Error::from(e).in_format(format))?
        .map_err(|id| {
            Open311Error::not_found(format!("no service request '{id}' here")).in_format(format)
        })?;
    Ok(respond(
        StatusCode::OK,
        format,
        "service_requests",
        &[found],
    ))
}

#[derive(Debug, Serialize)]
struct TokenOut {
    service_request_id: String,
    token: String,
}

/// `GET tokens/{token}.json|.xml`: the request a POST's token stands for.
async fn token(
    State(ctx): State<Ctx>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Open311Error> {
    let (token, format) = Format::split(&file)?;
    let params = parse_params(query.as_deref(), format)?;
    let scope = scope(&ctx, &params, format).await?;
    let not_found = || {
        Open311Error::not_found(format!(
            "no token '{token}' here; tokens are kept by the quarter node that took the request"
        ))
        .in_format(format)
    };
    if scope.role != Role::Quarter || token.is_empty() || token.len() > 64 {
        return Err(not_found());
    }
    let id = ctx
        .handle
        .local_get(format!("{TOKEN_PREFIX}{token}"))
        .await
        .map_err(|e| Open311Error::from(e).in_format(format))?
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(not_found)?;
    let check = id.clone();
    let exists = ctx
        .handle
        .read(move |view| {
            view.engine
                .doc(view.own_doc)
                .and_then(|doc| schema::item::<Concern>(doc, &check).ok().flatten())
                .is_some_and(|c| c.hidden.is_none())
        })
        .await
        .map_err(|e| Open311Error::from(e).in_format(format))?;
    if !exists {
        return Err(not_found());
    }
    Ok(respond(
        StatusCode::OK,
        format,
        "service_requests",
        &[TokenOut {
            service_request_id: id,
            token: token.to_string(),
        }],
    ))
}

/// `POST requests.json|.xml`.
async fn post_top(
    State(ctx): State<Ctx>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Open311Error> {
    let (stem, format) = Format::split(&file)?;
    if stem != "requests" {
        return Err(unknown_path(&file, format));
    }
    post_request(&ctx, query.as_deref(), &headers, &body, format)
        .await
        .map_err(|e| e.in_format(format))
}

#[derive(Debug, Serialize)]
struct Created {
    service_request_id: String,
    token: String,
    service_notice: Option<String>,
    account_id: Option<String>,
}

async fn post_request(
    ctx: &Ctx,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    format: Format,
) -> Result<Response, Open311Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("multipart/") {
        return Err(Open311Error::bad_request(
            "media uploads (multipart) are not taken: send the form URL-encoded, with a media_url",
        ));
    }
    // Query parameters too: some clients put api_key and jurisdiction_id in
    // the URL; the form body wins when both have a field.
    let mut params = parse_params(query, format)?;
    let form: Params = serde_urlencoded::from_bytes(body).map_err(|e| {
        Open311Error::bad_request(format!(
            "the body is not a URL-encoded form (application/x-www-form-urlencoded): {e}"
        ))
    })?;
    params.extend(form);
    let scope = scope(ctx, &params, format).await?;
    let own = match (scope.role, scope.quarter) {
        (Role::Quarter, Some(own)) => own,
        _ => return Err(centre_refuses_posts(&ctx.config, &params)),
    };
    let key = param(&params, "api_key").ok_or_else(|| {
        Open311Error::forbidden(
            "api_key is missing: ask the quarter office for a key (iq-node apikey create)",
        )
    })?;
    if keys::active_key_name(&ctx.handle, key).await?.is_none() {
        return Err(Open311Error::forbidden(
            "api_key is not valid here (unknown or revoked): ask the quarter office for a key",
        ));
    }
    let code = param(&params, "service_code").ok_or_else(|| {
        Open311Error::bad_request("service_code is missing: pick one from services.json")
    })?;
    let service = ctx.config.service(code).ok_or_else(|| {
        Open311Error::not_found(format!(
            "no service '{code}'; the services are {}",
            ctx.config.codes()
        ))
    })?;
    let coordinate = |name: &str| -> Result<Option<f64>, Open311Error> {
        param(&params, name)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        Open311Error::bad_request(format!("{name} {v:?} is not a number"))
                    })
            })
            .transpose()
    };
    let (lat, long) = (coordinate("lat")?, coordinate("long")?);
    let address = param(&params, "address_string")
        .or_else(|| param(&params, "address_id"))
        .map(str::to_owned);
    if lat.is_none() && long.is_none() && address.is_none() {
        return Err(Open311Error::bad_request(
            "a location is missing: give lat and long, or address_string, or address_id",
        ));
    }
    let mut answers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &params {
        if let Some(rest) = k.strip_prefix("attribute[") {
            let code = rest
                .strip_suffix("][]")
                .or_else(|| rest.strip_suffix(']'))
                .filter(|c| !c.is_empty() && !c.contains(['[', ']']))
                .ok_or_else(|| {
                    Open311Error::bad_request(format!(
                        "{k:?} is not attribute[CODE] or attribute[CODE][]"
                    ))
                })?;
            answers.entry(code.to_string()).or_default().push(v.clone());
        }
    }
    let attributes = service
        .check_answers(answers)
        .map_err(Open311Error::bad_request)?;
    let description = param(&params, "description")
        .map(str::to_owned)
        .unwrap_or_else(|| service.name.clone());
    let mut concern = Concern::new(service.code.clone(), description, lat, long, now_ms());
    concern.address = address;
    concern.media_url = param(&params, "media_url").map(str::to_owned);
    concern.agency = service.agency.clone();
    concern.attributes = (!attributes.is_empty()).then_some(attributes);
    concern
        .validate()
        .map_err(|e| Open311Error::bad_request(e.to_string()))?;
    let name = [param(&params, "first_name"), param(&params, "last_name")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let account_id = param(&params, "account_id").map(str::to_owned);
    let reporter = Reporter {
        name: (!name.is_empty()).then_some(name),
        email: param(&params, "email").map(str::to_owned),
        phone: param(&params, "phone").map(str::to_owned),
        device_id: param(&params, "device_id").map(str::to_owned),
        account_id: account_id.clone(),
    };
    if !reporter.is_empty() {
        reporter
            .validate()
            .map_err(|e| Open311Error::bad_request(e.message))?;
        // Personal data first, local only; the replicated concern carries
        // only a random reference to it.
        let reference = iq_protocol::workflows::new_id().replace('-', "");
        let bytes = serde_json::to_vec(&reporter).map_err(|_| Open311Error::unavailable())?;
        ctx.handle
            .local_put(format!("reporter/{reference}"), bytes)
            .await?;
        concern.reporter_ref = Some(reference);
    }
    let token = iq_protocol::workflows::new_id().replace('-', "");
    ctx.handle
        .local_put(
            format!("{TOKEN_PREFIX}{token}"),
            concern.id.clone().into_bytes(),
        )
        .await?;
    let written = concern.clone();
    ctx.handle
        .write(DocId::quarter(&own), move |tx| {
            schema::put_concern(tx, &written)
        })
        .await
        .map_err(|e| match e {
            iq_protocol::replicator::WriteError::Invalid(e) => {
                Open311Error::bad_request(e.to_string())
            }
            _ => Open311Error::unavailable(),
        })?;
    tracing::info!(id = %concern.id, service = %concern.category, "Open311 request recorded");
    Ok(respond(
        StatusCode::OK,
        format,
        "service_requests",
        &[Created {
            service_request_id: concern.id,
            token,
            service_notice: None,
            account_id,
        }],
    ))
}

/// The centre's answer to a POST: it holds no quarter's requests; the
/// quarter's node takes them.
fn centre_refuses_posts(config: &Open311Config, params: &Params) -> Open311Error {
    let quarter = param(params, "jurisdiction_id");
    let endpoint = quarter.and_then(|q| config.quarter_endpoints.get(q));
    let known: BTreeSet<&String> = config.quarter_endpoints.keys().collect();
    let where_to = match (quarter, endpoint) {
        (Some(q), Some(url)) => format!("post it to quarter '{q}' at {url}/requests.xml"),
        (Some(q), None) => format!(
            "post it to the Open311 endpoint of quarter '{q}''s node (/open311/v2 on that node; ask its quarter office)"
        ),
        (None, _) if !known.is_empty() => format!(
            "post it to the quarter's own endpoint: {}",
            config
                .quarter_endpoints
                .iter()
                .map(|(q, url)| format!("{q}: {url}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, _) => "post it to the Open311 endpoint of the quarter's own node (/open311/v2 on that node; ask its quarter office)".to_string(),
    };
    Open311Error::bad_request(format!(
        "the city's endpoint is read-only and takes no service requests: {where_to}"
    ))
}
