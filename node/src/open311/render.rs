//! The two formats of GeoReport v2 (`.json` and `.xml`), its W3C timestamps
//! and its error answers. Each answer is built once as serde data; the XML
//! is derived from the same JSON tree, with the spec's element names for
//! list items, so both formats always carry the same fields.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use serde::Serialize;
use serde_json::Value;

/// A response format, named by the path's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    /// Splits `services.json` into (`services`, Json). Unknown or missing
    /// extensions are an error in XML, the spec's required format.
    pub fn split(file: &str) -> Result<(&str, Format), Open311Error> {
        match file.rsplit_once('.') {
            Some((stem, "json")) => Ok((stem, Format::Json)),
            Some((stem, "xml")) => Ok((stem, Format::Xml)),
            _ => Err(Open311Error::new(
                StatusCode::NOT_FOUND,
                format!(
                    "'{file}' names no format: add .json or .xml, e.g. /open311/v2/services.xml"
                ),
            )
            .in_format(Format::Xml)),
        }
    }
}

/// XML element names of list items, by the name of the list.
fn item_name(list: &str) -> &'static str {
    match list {
        "services" => "service",
        "service_requests" => "request",
        "errors" => "error",
        "attributes" => "attribute",
        "values" => "value",
        "endpoints" => "endpoint",
        "formats" => "format",
        _ => "item",
    }
}

/// Renders `body` in `format`; `root` names the XML document element (for a
/// list, the list's name: `services`, `service_requests`, `errors`).
pub fn respond<T: Serialize>(status: StatusCode, format: Format, root: &str, body: &T) -> Response {
    let value = match serde_json::to_value(body) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an Open311 answer");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    match format {
        Format::Json => (status, axum::Json(value)).into_response(),
        Format::Xml => match to_xml(root, &value) {
            Ok(xml) => (
                status,
                [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
                xml,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(error = %e, "cannot write an Open311 answer as XML");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        },
    }
}

/// The XML document for a JSON tree: objects become child elements, lists
/// repeat their item element, `null` is an empty element.
pub fn to_xml(root: &str, value: &Value) -> std::io::Result<String> {
    let mut writer = Writer::new(Vec::new());
    writer.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
    write_element(&mut writer, root, value)?;
    String::from_utf8(writer.into_inner()).map_err(std::io::Error::other)
}

fn write_element(writer: &mut Writer<Vec<u8>>, name: &str, value: &Value) -> std::io::Result<()> {
    let text = match value {
        Value::Null => {
            return writer.write_event(Event::Empty(BytesStart::new(name)));
        }
        Value::Object(map) => {
            writer.write_event(Event::Start(BytesStart::new(name)))?;
            for (key, child) in map {
                write_element(writer, key, child)?;
            }
            return writer.write_event(Event::End(BytesEnd::new(name)));
        }
        Value::Array(items) => {
            writer.write_event(Event::Start(BytesStart::new(name)))?;
            for item in items {
                write_element(writer, item_name(name), item)?;
            }
            return writer.write_event(Event::End(BytesEnd::new(name)));
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    writer.write_event(Event::Start(BytesStart::new(name)))?;
    writer.write_event(Event::Text(BytesText::new(&text)))?;
    writer.write_event(Event::End(BytesEnd::new(name)))
}

/// One entry of the spec's error list.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorEntry {
    pub code: u16,
    pub description: String,
}

/// An error answer in the spec's shape: a list of `code` + `description`,
/// in the format the request asked for.
#[derive(Debug)]
pub struct Open311Error {
    pub status: StatusCode,
    pub description: String,
    pub format: Format,
}

impl Open311Error {
    pub fn new(status: StatusCode, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
            format: Format::Xml,
        }
    }

    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, description)
    }

    pub fn forbidden(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, description)
    }

    pub fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, description)
    }

    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is shutting down or has stopped; try again later",
        )
    }

    pub fn in_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }
}

impl From<iq_protocol::replicator::ReplicatorError> for Open311Error {
    fn from(_: iq_protocol::replicator::ReplicatorError) -> Self {
        Self::unavailable()
    }
}

impl IntoResponse for Open311Error {
    fn into_response(self) -> Response {
        let body = [ErrorEntry {
            code: self.status.as_u16(),
            description: self.description,
        }];
        respond(self.status, self.format, "errors", &body)
    }
}

/// Formats unix milliseconds as a W3C timestamp with an explicit offset
/// (`2026-11-27T09:08:52+00:00`), as the spec's examples show.
pub fn w3c(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory]:[offset_minute]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Parses a W3C timestamp (RFC 3339, any offset, or a bare date meaning its
/// midnight UTC) into unix milliseconds. A `+` that arrived unescaped in a
/// query string reads as a space; it is taken back as `+`.
pub fn parse_w3c(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    let parsed = time::OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(&s.replace(' ', "+"), &Rfc3339))
        .ok()
        .or_else(|| {
            let date =
                time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
                    .ok()?;
            Some(date.midnight().assume_utc())
        })?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_have_offsets_and_parse_back() {
        assert_eq!(w3c(1_500), "1970-01-01T00:00:01+00:00");
        assert_eq!(parse_w3c("1970-01-01T00:00:01+00:00"), Some(1_000));
        assert_eq!(parse_w3c("1970-01-01T01:00:01+01:00"), Some(1_000));
        assert_eq!(parse_w3c("1970-01-01T01:00:01 01:00"), Some(1_000));
        assert_eq!(parse_w3c("1970-01-02T00:00:00Z"), Some(86_400_000));
        assert_eq!(parse_w3c("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_w3c("yesterday"), None);
        assert_eq!(w3c(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn xml_names_list_items_as_the_spec_does_and_escapes_text() {
        let value = json!([{"service_code": "a&b", "metadata": true, "group": null,
            "attributes": [{"values": [{"key": "k", "name": "<n>"}]}]}]);
        let xml = to_xml("services", &value).expect("xml");
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><services><service>\
             <attributes><attribute><values><value><key>k</key><name>&lt;n&gt;</name></value>\
             </values></attribute></attributes><group/><metadata>true</metadata>\
             <service_code>a&amp;b</service_code></service></services>"
        );
    }

    #[test]
    fn a_path_without_a_known_extension_is_refused() {
        assert_eq!(
            Format::split("services.json").expect("json"),
            ("services", Format::Json)
        );
        assert_eq!(
            Format::split("requests.xml").expect("xml"),
            ("requests", Format::Xml)
        );
        assert!(Format::split("services").is_err());
        assert!(Format::split("services.csv").is_err());
    }
}
