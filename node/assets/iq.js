// iq pages: shared helpers. No framework, no build step, nothing loaded from
// elsewhere. Data from the API is put into the page only as text (never as
// HTML), since it comes from other nodes and is not trusted.
"use strict";

const IQ = (() => {
  const dict = {
    en: {
      lang: "Deutsch", live: "live", reconnecting: "reconnecting…", updated: "updated",
      centre_title: "City centre", quarter_title: "Quarter office",
      federation: "Federation", quarter: "Quarter", status: "Status", online: "online", offline: "offline",
      last_sync: "Last sync", behind: "Behind (changes)", concerns: "Concerns", versions: "Node versions",
      never: "never", concerns_overview: "Concerns by status and category", total: "Total",
      by_status: "By status", by_category: "By category", latest_concerns: "Latest concerns",
      category: "Category", description: "Description", created: "Created",
      inbox: "Escalation inbox (oldest first)", kind: "Kind", item: "Item", reason: "Reason", since: "Since",
      respond: "Respond", decision: "Decision", department: "Department", note: "Note",
      accepted: "accepted", declined: "declined", forwarded: "forwarded", send: "Send",
      inbox_empty: "No open escalations.", consultations: "Consultations", question: "Question",
      deadline: "Deadline", option: "Option", yes: "Yes", no: "No", abstain: "Abstain", quarters: "Quarters",
      not_answered: "Not answered yet", all_answered: "Every quarter answered.", none: "None.",
      budget: "Budget: frames and allocations", year: "Year", frame: "Frame", allocated: "Allocated",
      remaining: "Remaining", over_frame: "OVER FRAME", within: "within frame",
      directives: "Directives", ack_due: "Acknowledge by", acknowledged: "Acknowledged",
      pending: "Pending", overdue: "OVERDUE", open: "open", closed: "closed",
      new_concern: "Record a concern", address: "Address", record: "Record",
      our_concerns: "Our concerns", update: "Update", notes: "History",
      received: "received", in_process: "in process", processed: "processed", rejected: "rejected",
      escalations: "Escalations and the centre's responses", response: "Centre's response",
      awaiting: "awaiting response", proposals: "Proposals and supports", title: "Title",
      supports: "Supports", threshold: "Needed", answer: "Answer", position: "Position",
      body: "Decided by", submit: "Submit", answered: "answered", acknowledge: "Acknowledge",
      implemented: "implemented", state: "State", comment: "Comment", your_ack: "Our acknowledgement",
      connection: "Connection to peers", peers: "peers connected", saved: "Saved.",
      no_concerns: "No concerns yet.", by_centre: "centre", concern: "concern", proposal: "proposal",
    },
    de: {
      lang: "English", live: "live", reconnecting: "verbinde neu…", updated: "aktualisiert",
      centre_title: "Stadtzentrale", quarter_title: "Quartiersbüro",
      federation: "Verbund", quarter: "Quartier", status: "Status", online: "online", offline: "offline",
      last_sync: "Letzter Abgleich", behind: "Rückstand (Änderungen)", concerns: "Anliegen", versions: "Knotenversionen",
      never: "nie", concerns_overview: "Anliegen nach Status und Kategorie", total: "Gesamt",
      by_status: "Nach Status", by_category: "Nach Kategorie", latest_concerns: "Neueste Anliegen",
      category: "Kategorie", description: "Beschreibung", created: "Erfasst",
      inbox: "Eskalationen (älteste zuerst)", kind: "Art", item: "Gegenstand", reason: "Begründung", since: "Seit",
      respond: "Antworten", decision: "Entscheidung", department: "Fachamt", note: "Vermerk",
      accepted: "angenommen", declined: "abgelehnt", forwarded: "weitergeleitet", send: "Senden",
      inbox_empty: "Keine offenen Eskalationen.", consultations: "Beteiligungen", question: "Frage",
      deadline: "Frist", option: "Option", yes: "Ja", no: "Nein", abstain: "Enthaltung", quarters: "Quartiere",
      not_answered: "Noch nicht geantwortet", all_answered: "Alle Quartiere haben geantwortet.", none: "Keine.",
      budget: "Budget: Rahmen und Mittelvergabe", year: "Jahr", frame: "Rahmen", allocated: "Vergeben",
      remaining: "Verbleibend", over_frame: "RAHMEN ÜBERSCHRITTEN", within: "im Rahmen",
      directives: "Vorgaben", ack_due: "Bestätigen bis", acknowledged: "Bestätigt",
      pending: "Ausstehend", overdue: "ÜBERFÄLLIG", open: "offen", closed: "geschlossen",
      new_concern: "Anliegen erfassen", address: "Adresse", record: "Erfassen",
      our_concerns: "Unsere Anliegen", update: "Ändern", notes: "Verlauf",
      received: "eingegangen", in_process: "in Bearbeitung", processed: "erledigt", rejected: "abgelehnt",
      escalations: "Eskalationen und Antworten der Zentrale", response: "Antwort der Zentrale",
      awaiting: "Antwort ausstehend", proposals: "Vorschläge und Unterstützungen", title: "Titel",
      supports: "Unterstützungen", threshold: "Benötigt", answer: "Antworten", position: "Stellungnahme",
      body: "Beschlossen von", submit: "Absenden", answered: "beantwortet", acknowledge: "Bestätigen",
      implemented: "umgesetzt", state: "Stand", comment: "Kommentar", your_ack: "Unsere Bestätigung",
      connection: "Verbindung", peers: "Gegenstellen verbunden", saved: "Gespeichert.",
      no_concerns: "Noch keine Anliegen.", by_centre: "Zentrale", concern: "Anliegen", proposal: "Vorschlag",
    },
  };
  let lang = localStorage.getItem("iq-lang") ||
    (new URLSearchParams(location.search).get("lang")) ||
    ((navigator.language || "").startsWith("de") ? "de" : "en");
  if (!dict[lang]) lang = "en";

  const t = (key) => (dict[lang][key] ?? dict.en[key] ?? key);

  // Builds an element; children are nodes or strings (set as text).
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  // A table with a caption and header cells scoped to their columns.
  function table(caption, heads, rows) {
    return h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, heads.map(([text, cls]) => h("th", { scope: "col", class: cls }, text)))),
      h("tbody", {}, rows));
  }

  async function api(method, path, body) {
    const opts = { method, headers: {} };
    if (body !== undefined) {
      opts.headers["content-type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const resp = await fetch(path, opts);
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) throw new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
    return data;
  }

  const fmtTime = (ms) => ms ? new Date(ms).toLocaleString(lang === "de" ? "de-DE" : "en-GB",
    { dateStyle: "short", timeStyle: "short" }) : t("never");
  const fmtDate = (ms) => ms ? new Date(ms).toLocaleDateString(lang === "de" ? "de-DE" : "en-GB") : "–";
  function fmtAgo(ms) {
    if (!ms) return t("never");
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return lang === "de" ? `vor ${s} s` : `${s} s ago`;
    const m = Math.round(s / 60);
    if (m < 120) return lang === "de" ? `vor ${m} min` : `${m} min ago`;
    return fmtTime(ms);
  }
  const fmtEuro = (cents) => (cents / 100).toLocaleString(lang === "de" ? "de-DE" : "en-GB",
    { style: "currency", currency: "EUR" });
  const badge = (text, kind) => h("span", { class: `badge ${kind}` }, text);
  const status = (s) => t(s) || s;

  // Replaces the body of the section with id `id`, keeping its heading.
  function fill(id, ...content) {
    const sec = document.getElementById(id);
    const body = sec.querySelector(".body");
    body.replaceChildren(...content.flat().filter(Boolean));
  }

  // Applies the language to static labels (data-t) and the toggle.
  function applyLang() {
    document.documentElement.lang = lang;
    for (const e of document.querySelectorAll("[data-t]")) e.textContent = t(e.dataset.t);
    // Messages of earlier submissions were in the other language.
    for (const e of document.querySelectorAll(".status-msg")) e.textContent = "";
  }

  function setupLangToggle(rerender) {
    const b = document.getElementById("lang");
    b.addEventListener("click", () => {
      lang = lang === "de" ? "en" : "de";
      localStorage.setItem("iq-lang", lang);
      applyLang();
      rerender();
    });
  }

  // Calls `refresh` now and whenever the node reports a change (server-sent
  // events); shows whether the live connection is up.
  function live(refresh) {
    const ind = document.getElementById("live");
    let pending = false, again = false;
    async function run() {
      if (pending) { again = true; return; }
      pending = true;
      try { await refresh(); } catch (e) { console.error(e); }
      pending = false;
      document.body.dataset.refreshed = String(Date.now());
      if (again) { again = false; run(); }
    }
    const es = new EventSource("/events");
    es.addEventListener("change", run);
    es.onopen = () => { ind.className = "live on"; ind.textContent = t("live"); };
    es.onerror = () => { ind.className = "live off"; ind.textContent = t("reconnecting"); };
    run();
    return run;
  }

  // Submits a form's action, showing success or the API's error next to it.
  async function submit(form, action, after) {
    const msg = form.querySelector(".status-msg");
    const btn = form.querySelector("button");
    btn.disabled = true;
    try {
      await action();
      if (msg) { msg.className = "status-msg"; msg.textContent = t("saved"); }
      if (after) await after();
    } catch (e) {
      if (msg) { msg.className = "status-msg error"; msg.textContent = e.message; }
    } finally {
      btn.disabled = false;
    }
  }

  return { t, h, table, api, fmtTime, fmtDate, fmtAgo, fmtEuro, badge, status, fill, applyLang, setupLangToggle, live, submit, get lang() { return lang; } };
})();
