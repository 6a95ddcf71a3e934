//! The pages in a real headless Chromium (Debian's `chromium`, installed by
//! `.ci/run`), against real daemons: the centre's dashboard loads and shows
//! a concern recorded at a quarter through the CLI without a reload; an
//! administrator responds to an escalation on the dashboard and the response
//! shows on the quarter's page; the office staff record a concern, answer a
//! consultation and acknowledge a directive on their page. Screenshots of
//! both pages are written to `target/screenshots/`.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use iq_tests::{Cluster, Node, Result, bin_dir, wait_until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Debian's Chromium; the test fails (it does not skip) without it.
fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the page tests need Chromium: install Debian's package with \
                 `apt-get install -y chromium` (.ci/run does)"
            )
        })
}

fn launch(profile: &std::path::Path) -> Result<Browser> {
    let args: Vec<&OsStr> = [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--lang=en-GB",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    let options = LaunchOptions::default_builder()
        .path(Some(chromium()))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1400, 1700)))
        .user_data_dir(Some(profile.to_path_buf()))
        .args(args)
        .idle_browser_timeout(Duration::from_secs(300))
        .build()
        .map_err(|e| e.to_string())?;
    Browser::new(options).map_err(|e| format!("cannot start Chromium: {e}"))
}

fn base(node: &Node) -> Result<String> {
    let addr = std::fs::read_to_string(node.dir.join("api.addr")).map_err(|e| e.to_string())?;
    Ok(format!("http://{}", addr.trim()))
}

/// Evaluates `expr` in the page.
fn eval(tab: &Tab, expr: &str) -> Result<Value> {
    tab.evaluate(expr, false)
        .map_err(|e| format!("evaluating {expr:?}: {e}"))
        .map(|o| o.value.unwrap_or(Value::Null))
}

/// Waits until `expr` is `true` in the page.
fn wait_js(tab: &Tab, what: &str, expr: &str) -> Result<()> {
    wait_until(what, WAIT, || {
        Ok((eval(tab, expr)? == Value::Bool(true)).then_some(()))
    })
}

/// The text of the element matching `selector` ("" if there is none).
fn text_of(tab: &Tab, selector: &str) -> Result<String> {
    let expr = format!(
        "(document.querySelector({}) || {{innerText: ''}}).innerText",
        serde_json::to_string(selector).map_err(|e| e.to_string())?
    );
    Ok(eval(tab, &expr)?.as_str().unwrap_or_default().to_owned())
}

/// Types into the field matching `selector` with real key events.
fn type_into(tab: &Tab, selector: &str, text: &str) -> Result<()> {
    tab.wait_for_element_with_custom_timeout(selector, WAIT)
        .and_then(|e| e.click()?.type_into(text).map(|_| ()))
        .map_err(|e| format!("typing into {selector}: {e}"))
}

fn click(tab: &Tab, selector: &str) -> Result<()> {
    tab.wait_for_element_with_custom_timeout(selector, WAIT)
        .and_then(|e| e.click().map(|_| ()))
        .map_err(|e| format!("clicking {selector}: {e}"))
}

fn select(tab: &Tab, selector: &str, value: &str) -> Result<()> {
    let expr = format!(
        "(() => {{ const s = document.querySelector({}); s.value = {}; return s.value; }})()",
        serde_json::to_string(selector).map_err(|e| e.to_string())?,
        serde_json::to_string(value).map_err(|e| e.to_string())?
    );
    let got = eval(tab, &expr)?;
    if got != Value::String(value.into()) {
        return Err(format!("{selector} has no option {value}: {got}"));
    }
    Ok(())
}

/// Writes a full-page screenshot to `target/screenshots/<name>.png`.
fn screenshot(tab: &Tab, name: &str) -> Result<PathBuf> {
    let dir = bin_dir()
        .parent()
        .map(|t| t.join("screenshots"))
        .ok_or("no target directory")?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .map_err(|e| format!("screenshot: {e}"))?;
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).map_err(|e| e.to_string())?;
    Ok(path)
}

fn open(browser: &Browser, url: &str, ready: &str) -> Result<Arc<Tab>> {
    let tab = browser.new_tab().map_err(|e| e.to_string())?;
    tab.navigate_to(url)
        .and_then(|t| t.wait_until_navigated())
        .map_err(|e| format!("opening {url}: {e}"))?;
    wait_js(&tab, &format!("{url} to render"), ready)?;
    Ok(tab)
}

#[test]
fn dashboard_and_quarter_page_in_headless_chromium() -> Result<()> {
    let c = Cluster::start(&["prohlis", "johannstadt"])?;
    let (centre, prohlis, johannstadt) = (&c.center, &c.quarters[0], &c.quarters[1]);

    // The frame the centre sets, and what prohlis escalates.
    centre.cli_ok(&[
        "budget",
        "frame",
        "--year",
        "2027",
        "--quarter",
        "prohlis",
        "--amount",
        "5000",
    ])?;
    let directive = centre.cli_ok(&[
        "directive",
        "issue",
        "--title",
        "Winter service",
        "--text",
        "Clear footpaths by 7:00",
        "--ack-due",
        "2099-01-31",
    ])?;
    let directive = directive.trim().to_owned();
    centre.cli_ok(&[
        "consultation",
        "open",
        "--question",
        "Tempo 30 on main roads?",
        "--option",
        "yes",
        "--option",
        "no",
        "--deadline",
        "2099-02-15",
    ])?;
    let concern = prohlis
        .cli_ok(&[
            "concern",
            "add",
            "--category",
            "lighting",
            "--description",
            "Dark underpass at Prohliser Allee",
        ])?
        .trim()
        .to_owned();
    let escalation = prohlis
        .cli_ok(&[
            "escalate",
            "--kind",
            "concern",
            "--id",
            &concern,
            "--reason",
            "Needs the lighting department",
        ])?
        .trim()
        .to_owned();
    wait_until("the centre to hold the escalation", WAIT, || {
        let inbox = centre.api_get("/api/v1/escalations?open=true")?;
        Ok(inbox
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|e| e["escalation"]["id"] == escalation.as_str())
            })
            .then_some(()))
    })?;

    let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
    let browser = launch(profile.path())?;

    // The dashboard loads with the federation and the inbox.
    let row = format!("#inbox tr[data-escalation='{escalation}']");
    let dash = open(
        &browser,
        &format!("{}/", base(centre)?),
        &format!(
            "!!document.querySelector(\"{row}\") && !!document.querySelector(\"#federation tr[data-quarter='johannstadt']\")"
        ),
    )?;
    let federation = text_of(&dash, "#federation")?;
    assert!(federation.contains("PROHLIS"), "{federation}");
    assert!(federation.contains("online"), "{federation}");
    assert!(
        federation.contains(env!("CARGO_PKG_VERSION")),
        "no node version: {federation}"
    );
    for (section, needle) in [
        ("#budget", "5,000.00"),
        ("#directives", "Winter service"),
        ("#consultations", "Tempo 30"),
    ] {
        let text = text_of(&dash, section)?;
        assert!(text.contains(needle), "{section} lacks {needle:?}: {text}");
    }

    // A concern recorded at another quarter through the CLI appears live:
    // the page is not reloaded (the marker survives).
    eval(&dash, "window.__notReloaded = true")?;
    johannstadt.cli_ok(&[
        "concern",
        "add",
        "--category",
        "graffiti",
        "--description",
        "Graffiti on the school wall",
    ])?;
    wait_js(
        &dash,
        "the new concern to appear on the dashboard",
        "document.querySelector('#latest').innerText.includes('Graffiti on the school wall')",
    )?;
    assert_eq!(
        eval(&dash, "window.__notReloaded === true")?,
        Value::Bool(true)
    );
    let shot = screenshot(&dash, "dashboard")?;
    eprintln!("dashboard screenshot: {}", shot.display());

    // The administrator responds on the page.
    select(&dash, &format!("{row} select[name=decision]"), "forwarded")?;
    type_into(
        &dash,
        &format!("{row} input[name=department]"),
        "Straßen- und Tiefbauamt",
    )?;
    type_into(&dash, &format!("{row} input[name=note]"), "Repair ordered")?;
    click(&dash, &format!("{row} button[type=submit]"))?;
    wait_js(
        &dash,
        "the escalation to leave the inbox",
        &format!("!document.querySelector(\"{row}\")"),
    )?;
    let answered = centre.api_get("/api/v1/escalations")?;
    let entry = answered
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["escalation"]["id"] == escalation.as_str())
        })
        .ok_or("escalation gone")?;
    assert_eq!(entry["response"]["decision"], "forwarded");
    assert_eq!(entry["response"]["department"], "Straßen- und Tiefbauamt");

    // The response shows on the quarter's page, with the escalation and
    // among the concern's notes.
    let page = open(
        &browser,
        &format!("{}/", base(prohlis)?),
        "!!document.querySelector('#concerns tr')",
    )?;
    let esc_row = format!("#escalations tr[data-escalation='{escalation}'] .response");
    wait_js(
        &page,
        "the centre's response on the quarter page",
        &format!(
            "(document.querySelector(\"{esc_row}\") || {{innerText: ''}}).innerText.includes('Repair ordered')"
        ),
    )?;
    let notes = text_of(&page, &format!("#concerns tr[data-concern='{concern}']"))?;
    assert!(notes.contains("Repair ordered"), "{notes}");

    // The office records a concern on its page.
    type_into(&page, "#c-category", "road-damage")?;
    type_into(&page, "#c-description", "Pothole at Jacob-Winter-Platz")?;
    click(&page, "#concern-form button[type=submit]")?;
    wait_js(
        &page,
        "the recorded concern in the list",
        "document.querySelector('#concerns').innerText.includes('Pothole at Jacob-Winter-Platz')",
    )?;
    let listed = prohlis.api_get("/api/v1/concerns?quarter=prohlis")?;
    assert!(
        listed.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["description"] == "Pothole at Jacob-Winter-Platz")),
        "the page's concern is not in the API: {listed}"
    );

    // It answers the consultation and acknowledges the directive.
    let card = "#consultations form";
    type_into(
        &page,
        &format!("{card} input[name=body]"),
        "Stadtbezirksbeirat",
    )?;
    type_into(
        &page,
        &format!("{card} textarea[name=position]"),
        "Safer school routes",
    )?;
    click(&page, &format!("{card} button[type=submit]"))?;
    wait_js(
        &page,
        "the answer to be recorded",
        "!document.querySelector('#consultations form') && document.querySelector('#consultations').innerText.includes('Safer school routes')",
    )?;
    select(&page, "#directives form select[name=state]", "received")?;
    click(&page, "#directives form button[type=submit]")?;
    wait_until("the centre to see the acknowledgement", WAIT, || {
        let list = centre.api_get("/api/v1/directives")?;
        Ok(list
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|d| d["directive"]["id"] == directive.as_str())
            })
            .is_some_and(|d| d["acks"]["prohlis"]["state"] == "received")
            .then_some(()))
    })?;
    wait_js(
        &page,
        "the acknowledgement on the quarter page",
        "document.querySelector('#directives').innerText.includes('Our acknowledgement')",
    )?;
    let shot = screenshot(&page, "quarter")?;
    eprintln!("quarter page screenshot: {}", shot.display());

    // German labels.
    click(&page, "#lang")?;
    wait_js(
        &page,
        "German labels",
        "document.documentElement.lang === 'de' && document.querySelector('#h-concerns').innerText === 'Unsere Anliegen'",
    )?;
    screenshot(&page, "quarter-de")?;
    Ok(())
}
