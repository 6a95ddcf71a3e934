//! Open311 GeoReport v2 on real nodes, through a real HTTP client: every
//! endpoint in both formats, each error code, the filters, API keys, the
//! centre's read-only aggregate — and a citizen app written with an
//! independent Open311 client library from PyPI (`georeport`), which posts,
//! reads back and sees the quarter move its request on.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use iq_tests::{Cluster, Node, Result, wait_until};
use quick_xml::events::Event;
use serde_json::Value;

/// One answer: status, content type, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        assert!(
            self.content_type.starts_with("application/json"),
            "content type {} for {}",
            self.content_type,
            self.body
        );
        serde_json::from_str(&self.body).map_err(|e| format!("bad JSON ({e}): {}", self.body))
    }

    fn xml(&self) -> Result<Elem> {
        assert!(
            self.content_type.starts_with("text/xml"),
            "content type {} for {}",
            self.content_type,
            self.body
        );
        parse_xml(&self.body)
    }
}

/// The node's Open311 base URL.
fn base(node: &Node) -> Result<String> {
    let addr = std::fs::read_to_string(node.dir.join("api.addr")).map_err(|e| e.to_string())?;
    Ok(format!("http://{}/open311/v2", addr.trim()))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn answer(mut resp: ureq::http::Response<ureq::Body>) -> Result<Answer> {
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

fn get(node: &Node, path: &str) -> Result<Answer> {
    let url = format!("{}/{path}", base(node)?);
    answer(
        agent()
            .get(&url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?,
    )
}

fn post(node: &Node, path: &str, form: &[(&str, &str)]) -> Result<Answer> {
    let url = format!("{}/{path}", base(node)?);
    answer(
        agent()
            .post(&url)
            .send_form(form.iter().copied())
            .map_err(|e| format!("POST {url}: {e}"))?,
    )
}

/// An XML element: name, text, children.
#[derive(Debug, Default, Clone)]
struct Elem {
    name: String,
    text: String,
    children: Vec<Elem>,
}

impl Elem {
    fn all(&self, name: &str) -> Vec<&Elem> {
        self.children.iter().filter(|c| c.name == name).collect()
    }

    fn child(&self, name: &str) -> &Elem {
        self.children
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("<{}> has no <{name}>: {self:?}", self.name))
    }

    fn text_of(&self, name: &str) -> &str {
        &self.child(name).text
    }
}

fn parse_xml(text: &str) -> Result<Elem> {
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack = vec![Elem::default()];
    let name_of = |raw: &str| raw.to_owned();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("not XML ({e}): {text}"))?;
        let top = stack.len() - 1;
        match event {
            Event::Start(e) => stack.push(Elem {
                name: name_of(e.name().as_ref()),
                ..Elem::default()
            }),
            Event::Empty(e) => stack[top].children.push(Elem {
                name: name_of(e.name().as_ref()),
                ..Elem::default()
            }),
            Event::Text(t) => stack[top].text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_predefined_entity(&r.xml10_content())
                        .ok_or_else(|| format!("unknown entity in {text}"))?
                        .to_owned(),
                };
                stack[top].text.push_str(&resolved);
            }
            Event::End(_) => {
                let done = stack.pop().ok_or("unbalanced XML")?;
                stack
                    .last_mut()
                    .ok_or("unbalanced XML")?
                    .children
                    .push(done);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut root = stack.pop().ok_or("no XML")?;
    if !stack.is_empty() || root.children.len() != 1 {
        return Err(format!("not one XML document: {text}"));
    }
    Ok(root.children.remove(0))
}

/// Checks an error answer: the status, and the spec's shape in both formats
/// (a list of `code` + `description`, the code equal to the status).
fn assert_error(a: &Answer, status: u16, xml: bool, mentions: &str) -> Result<()> {
    assert_eq!(a.status, status, "{}", a.body);
    let (code, description) = if xml {
        let errors = a.xml()?;
        assert_eq!(errors.name, "errors");
        let error = errors.child("error");
        (
            error.text_of("code").to_owned(),
            error.text_of("description").to_owned(),
        )
    } else {
        let list = a.json()?;
        let first = &list[0];
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        (first["code"].to_string(), first["description"].to_string())
    };
    assert_eq!(code, status.to_string(), "{}", a.body);
    assert!(
        description.contains(mentions),
        "error {description:?} does not mention {mentions:?}"
    );
    Ok(())
}

/// The ids in a `requests.json` answer.
fn ids(a: &Answer) -> Result<Vec<String>> {
    assert_eq!(a.status, 200, "{}", a.body);
    Ok(a.json()?
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|r| r["service_request_id"].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn every_open311_endpoint_answers_in_json_and_xml_with_the_spec_errors_and_filters() -> Result<()> {
    let c = Cluster::start(&["prohlis", "johannstadt"])?;
    let q = &c.quarters[0];

    // Discovery names this endpoint and both formats.
    let d = get(q, "discovery.json")?.json()?;
    assert!(
        d["endpoints"][0]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/open311/v2")),
        "{d}"
    );
    assert_eq!(
        d["endpoints"][0]["formats"],
        serde_json::json!(["text/xml", "application/json"])
    );
    let dx = get(q, "discovery.xml")?.xml()?;
    assert_eq!(dx.name, "discovery");
    let formats: Vec<&str> = dx
        .child("endpoints")
        .child("endpoint")
        .child("formats")
        .all("format")
        .iter()
        .map(|f| f.text.as_str())
        .collect();
    assert_eq!(formats, ["text/xml", "application/json"]);

    // Services: the German default set, the same in both formats.
    let services = get(q, "services.json")?.json()?;
    let codes: Vec<&str> = services
        .as_array()
        .ok_or("services is not a list")?
        .iter()
        .filter_map(|s| s["service_code"].as_str())
        .collect();
    for code in [
        "road-damage",
        "lighting",
        "litter",
        "green-spaces",
        "playgrounds",
        "graffiti",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
    let sx = get(q, "services.xml")?.xml()?;
    assert_eq!(sx.name, "services");
    let xml_codes: Vec<&str> = sx
        .all("service")
        .iter()
        .map(|s| s.text_of("service_code"))
        .collect();
    assert_eq!(codes, xml_codes);
    let lighting = sx
        .all("service")
        .into_iter()
        .find(|s| s.text_of("service_code") == "lighting")
        .ok_or("no lighting")?;
    assert_eq!(lighting.text_of("service_name"), "Straßenbeleuchtung");
    assert_eq!(lighting.text_of("metadata"), "true");
    assert_eq!(lighting.text_of("type"), "realtime");

    // Service definitions with their attributes.
    let def = get(q, "services/road-damage.json")?.json()?;
    assert_eq!(def["service_code"], "road-damage");
    let danger = def["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["code"] == "danger"))
        .ok_or("no danger attribute")?;
    assert_eq!(danger["datatype"], "singlevaluelist");
    assert_eq!(danger["required"], true);
    assert_eq!(danger["values"][0]["key"], "yes");
    let defx = get(q, "services/illegal-dumping.xml")?.xml()?;
    assert_eq!(defx.name, "service_definition");
    let kind = defx.child("attributes").child("attribute");
    assert_eq!(kind.text_of("datatype"), "multivaluelist");
    assert_eq!(kind.child("values").all("value").len(), 5);
    assert_error(&get(q, "services/no-such.json")?, 404, false, "no-such")?;
    assert_error(&get(q, "services/no-such.xml")?, 404, true, "no-such")?;
    assert_error(&get(q, "services.csv")?, 404, true, ".json or .xml")?;
    assert_error(&get(q, "nothing.json")?, 404, false, "discovery")?;

    // API keys: created through the CLI, shown once, listed without the key.
    let key = q.cli_ok(&["apikey", "create", "--name", "maengelmelder"])?;
    let key = key.trim();
    assert_eq!(key.len(), 64, "{key}");
    let listed = q.cli_json(&["apikey", "list"])?;
    assert_eq!(listed[0]["name"], "maengelmelder");
    assert!(listed[0]["revoked"].is_null());
    assert!(!listed.to_string().contains(key), "the list shows the key");
    let again = q.cli(&["apikey", "create", "--name", "maengelmelder"]);
    assert!(!again.status.success());

    // Each error code of POST, in both formats.
    let good: Vec<(&str, &str)> = vec![
        ("api_key", key),
        ("service_code", "road-damage"),
        ("lat", "51.0013"),
        ("long", "13.7952"),
        ("description", "Schlagloch & Riss <tief>"),
        ("attribute[danger]", "yes"),
        ("attribute[surface]", "road"),
        ("email", "erika@example.org"),
        ("first_name", "Erika"),
        ("last_name", "Muster"),
        ("phone", "+49 351 000000"),
        ("device_id", "device-42"),
        ("account_id", "acct-7"),
    ];
    let without = |field: &str| -> Vec<(&str, &str)> {
        good.iter().copied().filter(|(k, _)| *k != field).collect()
    };
    let with = |field: &'static str, value: &'static str| -> Vec<(&str, &str)> {
        let mut form = without(field);
        form.push((field, value));
        form
    };
    assert_error(
        &post(q, "requests.json", &without("api_key"))?,
        403,
        false,
        "api_key",
    )?;
    assert_error(
        &post(q, "requests.xml", &with("api_key", "guessed"))?,
        403,
        true,
        "api_key",
    )?;
    assert_error(
        &post(q, "requests.json", &without("service_code"))?,
        400,
        false,
        "service_code",
    )?;
    assert_error(
        &post(q, "requests.xml", &with("service_code", "unicorns"))?,
        404,
        true,
        "unicorns",
    )?;
    let nowhere: Vec<(&str, &str)> = good
        .iter()
        .copied()
        .filter(|(k, _)| *k != "lat" && *k != "long")
        .collect();
    assert_error(&post(q, "requests.json", &nowhere)?, 400, false, "location")?;
    assert_error(
        &post(q, "requests.xml", &with("lat", "north"))?,
        400,
        true,
        "lat",
    )?;
    assert_error(
        &post(q, "requests.json", &without("attribute[danger]"))?,
        400,
        false,
        "attribute[danger] is required",
    )?;
    assert_error(
        &post(q, "requests.json", &with("attribute[danger]", "perhaps"))?,
        400,
        false,
        "yes, no",
    )?;
    assert_error(
        &post(q, "requests.xml", &with("attribute[colour]", "red"))?,
        400,
        true,
        "colour",
    )?;
    assert_error(
        &post(q, "requests.json", &with("email", "nobody"))?,
        400,
        false,
        "email",
    )?;
    assert_error(
        &post(q, "requests.json", &with("media_url", "ftp://x"))?,
        400,
        false,
        "media URL",
    )?;
    assert_error(
        &post(q, "requests.json", &with("jurisdiction_id", "johannstadt"))?,
        404,
        false,
        "johannstadt",
    )?;
    let multipart = agent()
        .post(&format!("{}/requests.json", base(q)?))
        .header("Content-Type", "multipart/form-data; boundary=x")
        .send("--x--")
        .map_err(|e| e.to_string())?;
    assert_error(&answer(multipart)?, 400, false, "multipart")?;
    // Nothing refused was recorded.
    assert!(q.concern_ids(Some("prohlis"))?.is_empty());

    // Two good requests: one as XML with personal data and attributes, one
    // as JSON with an address and a multi-value list.
    let first = post(q, "requests.xml", &good)?;
    assert_eq!(first.status, 200, "{}", first.body);
    let created = first.xml()?;
    assert_eq!(created.name, "service_requests");
    let created = created.child("request");
    let id_a = created.text_of("service_request_id").to_owned();
    let token_a = created.text_of("token").to_owned();
    assert_eq!(created.text_of("account_id"), "acct-7");
    let second = post(
        q,
        "requests.json",
        &[
            ("api_key", key),
            ("service_code", "illegal-dumping"),
            ("address_string", "Prohliser Allee 1"),
            ("attribute[kind][]", "bulky"),
            ("attribute[kind][]", "electronics"),
        ],
    )?;
    assert_eq!(second.status, 200, "{}", second.body);
    let second = second.json()?;
    let id_b = second[0]["service_request_id"]
        .as_str()
        .ok_or("no id")?
        .to_owned();

    // Read back, both formats, with the fields of the spec.
    let one = get(q, &format!("requests/{id_a}.json"))?.json()?;
    let a = &one[0];
    assert_eq!(a["service_code"], "road-damage");
    assert_eq!(a["service_name"], "Straßenschäden");
    assert_eq!(a["description"], "Schlagloch & Riss <tief>");
    assert_eq!(a["status"], "open");
    assert_eq!(a["detailed_status"], "RECEIVED");
    assert_eq!(a["lat"], 51.0013);
    assert_eq!(a["jurisdiction_id"], "prohlis");
    let requested = a["requested_datetime"]
        .as_str()
        .ok_or("no time")?
        .to_owned();
    assert!(
        requested.len() == 25 && requested.ends_with("+00:00"),
        "not a W3C time with offset: {requested}"
    );
    let ax = get(q, &format!("requests/{id_a}.xml"))?.xml()?;
    let ax = ax.child("request");
    assert_eq!(ax.text_of("description"), "Schlagloch & Riss <tief>");
    assert_eq!(ax.text_of("requested_datetime"), requested);
    assert_eq!(ax.text_of("service_request_id"), id_a);
    let b = &get(q, &format!("requests/{id_b}.json"))?.json()?[0];
    assert_eq!(b["address"], "Prohliser Allee 1");
    assert_eq!(b["attributes"][0]["code"], "kind");
    assert_eq!(
        b["attributes"][0]["values"],
        serde_json::json!(["bulky", "electronics"])
    );
    assert_eq!(b["description"], "Illegale Müllablagerung");
    assert_error(
        &get(q, "requests/no-such-id.json")?,
        404,
        false,
        "no-such-id",
    )?;
    assert_error(&get(q, "requests/no-such-id.xml")?, 404, true, "no-such-id")?;

    // Tokens.
    let t = get(q, &format!("tokens/{token_a}.json"))?.json()?;
    assert_eq!(t[0]["service_request_id"], id_a.as_str());
    assert_eq!(t[0]["token"], token_a.as_str());
    let tx = get(q, &format!("tokens/{token_a}.xml"))?.xml()?;
    assert_eq!(tx.child("request").text_of("service_request_id"), id_a);
    assert_error(&get(q, "tokens/nope.json")?, 404, false, "nope")?;
    assert_error(&get(q, "tokens/nope.xml")?, 404, true, "nope")?;

    // Personal data stays on the quarter node: the reporter is there, the
    // replicated concern (as the centre holds it) carries none of it.
    let reporter = q.cli_json(&["concern", "reporter", &id_a])?;
    assert_eq!(reporter["name"], "Erika Muster");
    assert_eq!(reporter["email"], "erika@example.org");
    assert_eq!(reporter["phone"], "+49 351 000000");
    assert_eq!(reporter["device_id"], "device-42");
    let at_centre = wait_until(
        "the centre to hold both requests",
        Duration::from_secs(15),
        || {
            let list = ids(&get(&c.center, "requests.json?jurisdiction_id=prohlis")?)?;
            Ok((list.len() == 2).then_some(list))
        },
    )?;
    assert_eq!(at_centre, [id_b.as_str(), id_a.as_str()], "newest first");
    let replicated = c.center.api_get(&format!("/api/v1/concerns/{id_a}"))?;
    let text = replicated.to_string();
    for personal in [
        "Erika",
        "Muster",
        "erika@example.org",
        // The whole number: a fragment like "351" can occur by chance in a
        // millisecond timestamp.
        "+49 351 000000",
        "device-42",
        "acct-7",
    ] {
        assert!(
            !text.contains(personal),
            "{personal} left the quarter: {text}"
        );
    }

    // Filters: ids (which override the rest), service code, status, dates,
    // detailed status, update time, paging.
    let both = format!("{id_a},{id_b}");
    assert_eq!(
        ids(&get(
            q,
            &format!("requests.json?service_request_id={both}&status=closed")
        )?)?
        .len(),
        2
    );
    assert_eq!(
        ids(&get(q, "requests.json?service_code=illegal-dumping")?)?,
        [id_b.as_str()]
    );
    assert_eq!(
        ids(&get(
            q,
            "requests.json?service_code=road-damage,illegal-dumping"
        )?)?
        .len(),
        2
    );
    assert_error(
        &get(q, "requests.json?service_code=unicorns")?,
        404,
        false,
        "unicorns",
    )?;
    q.cli_ok(&[
        "concern",
        "status",
        &id_b,
        "processed",
        "--note",
        "Abgeholt",
    ])?;
    assert_eq!(
        ids(&get(q, "requests.json?status=closed")?)?,
        [id_b.as_str()]
    );
    assert_eq!(ids(&get(q, "requests.json?status=open")?)?, [id_a.as_str()]);
    assert_eq!(ids(&get(q, "requests.json?status=open,closed")?)?.len(), 2);
    assert_error(
        &get(q, "requests.xml?status=pending")?,
        400,
        true,
        "pending",
    )?;
    assert_eq!(
        ids(&get(q, "requests.json?detailed_status=PROCESSED")?)?,
        [id_b.as_str()]
    );
    let b_now = &get(q, &format!("requests/{id_b}.json"))?.json()?[0];
    assert_eq!(b_now["status_notes"], "Abgeholt");
    assert_eq!(b_now["status"], "closed");
    let today = &requested[..10];
    assert_eq!(
        ids(&get(q, &format!("requests.json?start_date={today}"))?)?.len(),
        2
    );
    assert!(ids(&get(q, &format!("requests.json?end_date={today}"))?)?.is_empty());
    assert!(
        ids(&get(
            q,
            "requests.json?start_date=2020-01-01T00:00:00%2B01:00&end_date=2020-03-01T00:00:00Z"
        )?)?
        .is_empty()
    );
    assert_error(
        &get(q, "requests.json?start_date=2020-01-01&end_date=2020-06-01")?,
        400,
        false,
        "90 days",
    )?;
    assert_error(
        &get(q, "requests.xml?start_date=tomorrow")?,
        400,
        true,
        "W3C",
    )?;
    assert_eq!(
        ids(&get(q, "requests.json?updated_after=2020-01-01T00:00:00Z")?)?.len(),
        2
    );
    assert!(ids(&get(q, "requests.json?updated_after=2999-01-01T00:00:00Z")?)?.is_empty());
    assert_eq!(ids(&get(q, "requests.json?page_size=1")?)?, [id_b.as_str()]);
    assert_eq!(
        ids(&get(q, "requests.json?page_size=1&page=2")?)?,
        [id_a.as_str()]
    );
    assert!(ids(&get(q, "requests.json?page_size=1&page=3")?)?.is_empty());
    assert_error(
        &get(q, "requests.json?page_size=5000")?,
        400,
        false,
        "page_size",
    )?;
    let listed = get(q, "requests.xml?status=open")?.xml()?;
    assert_eq!(listed.name, "service_requests");
    assert_eq!(listed.all("request").len(), 1);
    assert_error(
        &get(q, "requests.json?jurisdiction_id=johannstadt")?,
        404,
        false,
        "johannstadt",
    )?;

    // The centre's response to an escalated request shows in status_notes.
    q.cli_ok(&[
        "concern",
        "status",
        &id_a,
        "in_process",
        "--note",
        "Vor Ort geprüft",
    ])?;
    let escalation = q.cli_json(&[
        "escalate",
        "--kind",
        "concern",
        "--id",
        &id_a,
        "--reason",
        "Braucht das Tiefbauamt",
    ])?;
    let escalation = escalation["id"]
        .as_str()
        .ok_or("no escalation id")?
        .to_owned();
    wait_until(
        "the centre to see the escalation",
        Duration::from_secs(15),
        || {
            let inbox = c.center.cli_json(&["inbox"])?;
            Ok(inbox.to_string().contains(&escalation).then_some(()))
        },
    )?;
    c.center.cli_ok(&[
        "respond",
        "--quarter",
        "prohlis",
        "--escalation",
        &escalation,
        "--decision",
        "forwarded",
        "--department",
        "Straßen- und Tiefbauamt",
        "--note",
        "Reparatur beauftragt",
    ])?;
    let notes = wait_until(
        "the response in status_notes",
        Duration::from_secs(15),
        || {
            let a = get(q, &format!("requests/{id_a}.xml"))?.xml()?;
            let notes = a.child("request").text_of("status_notes").to_owned();
            Ok(notes.contains("Reparatur beauftragt").then_some(notes))
        },
    )?;
    assert!(notes.contains("Straßen- und Tiefbauamt"), "{notes}");

    // The centre: the same reads over every quarter, no posts.
    let j = &c.quarters[1];
    let jkey = j.cli_ok(&["apikey", "create", "--name", "app"])?;
    let posted = post(
        j,
        "requests.json",
        &[
            ("api_key", jkey.trim()),
            ("service_code", "graffiti"),
            ("lat", "51.05"),
            ("long", "13.76"),
            ("description", "Brücke besprüht"),
        ],
    )?;
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert_error(
        &post(
            j,
            "requests.json",
            &[("api_key", key), ("service_code", "graffiti")],
        )?,
        403,
        false,
        "api_key",
    )?;
    let everything = wait_until(
        "the centre to hold all three",
        Duration::from_secs(15),
        || {
            let all = get(&c.center, "requests.json")?.json()?;
            Ok((all.as_array().map(Vec::len) == Some(3)).then_some(all))
        },
    )?;
    let quarters: Vec<&str> = everything
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|r| r["jurisdiction_id"].as_str())
        .collect();
    assert!(quarters.contains(&"johannstadt") && quarters.contains(&"prohlis"));
    assert_eq!(
        ids(&get(
            &c.center,
            "requests.json?jurisdiction_id=johannstadt"
        )?)?
        .len(),
        1
    );
    let centre_a = get(&c.center, &format!("requests/{id_a}.xml"))?.xml()?;
    assert!(
        centre_a
            .child("request")
            .text_of("status_notes")
            .contains("Reparatur")
    );
    assert_eq!(
        get(&c.center, "services.xml")?.xml()?.all("service").len(),
        codes.len()
    );
    assert_eq!(get(&c.center, "discovery.json")?.status, 200);
    assert_error(
        &get(&c.center, "requests.json?jurisdiction_id=atlantis")?,
        404,
        false,
        "atlantis",
    )?;
    assert_error(
        &post(
            &c.center,
            "requests.xml",
            &[("jurisdiction_id", "prohlis"), ("api_key", key)],
        )?,
        400,
        true,
        "quarter 'prohlis'",
    )?;
    assert_error(
        &get(&c.center, &format!("tokens/{token_a}.json"))?,
        404,
        false,
        "token",
    )?;

    // A revoked key is refused at once.
    let revoked = q.cli_json(&["apikey", "revoke", "maengelmelder"])?;
    assert!(revoked["revoked"].is_string());
    assert_error(&post(q, "requests.json", &good)?, 403, false, "revoked")?;
    assert!(
        q.cli(&["apikey", "revoke", "nobody", "--json"])
            .status
            .code()
            == Some(1)
    );
    Ok(())
}

/// The Python that has the client library: `IQ_OPEN311_PYTHON`, or the
/// virtualenv `.ci/run` creates in `target/open311-venv`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("IQ_OPEN311_PYTHON") {
        return PathBuf::from(p);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    target.join("open311-venv/bin/python")
}

fn run_app(args: &[&str]) -> Result<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("open311_app.py");
    let python = python();
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} ({e}): the citizen-app test needs Python with the georeport \
                 client; create it with: python3 -m venv target/open311-venv && \
                 target/open311-venv/bin/pip install georeport==0.3.1 xmltodict==0.14.2 \
                 requests==2.32.5 (as .ci/run does), or set IQ_OPEN311_PYTHON",
                python.display()
            )
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named") {
        return Err(format!(
            "{} lacks the georeport client library: {}/bin/pip install georeport==0.3.1 \
             xmltodict==0.14.2 requests==2.32.5",
            python.display(),
            python
                .parent()
                .and_then(|p| p.parent())
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    if !out.status.success() {
        return Err(format!("the app failed: {stderr}"));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| format!("app printed no JSON ({e}): {stdout}"))
}

#[test]
fn a_citizen_app_built_on_the_georeport_library_reports_and_follows_a_request() -> Result<()> {
    let c = Cluster::start(&["prohlis"])?;
    let q = &c.quarters[0];
    let key = q.cli_ok(&["apikey", "create", "--name", "citizen-app"])?;
    let base = base(q)?;

    let reported = run_app(&[&base, "report", key.trim()])?;
    let services = reported["services"].as_array().ok_or("no services")?;
    assert!(services.iter().any(|s| s == "lighting"), "{reported}");
    assert_eq!(reported["required"], serde_json::json!(["danger"]));
    let id = reported["id"].as_str().ok_or("no id")?.to_owned();
    for format in ["json", "xml"] {
        let r = &reported[format];
        assert_eq!(r["service_request_id"], id.as_str(), "{format}: {r}");
        assert_eq!(r["status"], "open", "{format}: {r}");
        assert_eq!(r["service_code"], "road-damage", "{format}: {r}");
        assert_eq!(
            r["description"], "Schlagloch vor der Haltestelle Jacob-Winter-Platz",
            "{format}: {r}"
        );
    }
    assert_eq!(reported["listed_open"], serde_json::json!([id]));
    // The quarter office sees it as a concern, with the reporter kept here.
    let concern = q.cli_json(&["concern", "show", &id])?;
    assert_eq!(concern["category"], "road-damage");
    assert_eq!(
        q.cli_json(&["concern", "reporter", &id])?["name"],
        "Erika Muster"
    );

    // The quarter moves it on; the app sees the new status and the note.
    q.cli_ok(&[
        "concern",
        "status",
        &id,
        "processed",
        "--note",
        "Loch verfüllt",
    ])?;
    let followed = run_app(&[&base, "status", &id])?;
    for format in ["json", "xml"] {
        let r = &followed[format];
        assert_eq!(r["status"], "closed", "{format}: {r}");
        assert_eq!(r["status_notes"], "Loch verfüllt", "{format}: {r}");
        assert_eq!(r["detailed_status"], "PROCESSED", "{format}: {r}");
    }
    assert_eq!(followed["closed"], serde_json::json!([id]));
    Ok(())
}
