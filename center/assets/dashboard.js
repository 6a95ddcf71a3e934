// The centre's dashboard: the whole federation at a glance, refreshed
// whenever the centre's replicas change.
"use strict";
(() => {
  const { t, h, table, api, fmtTime, fmtDate, fmtAgo, fmtEuro, badge, status, fill, submit } = IQ;
  let last = null;

  function federation(quarters, names) {
    if (!quarters.length) return h("p", { class: "empty" }, t("none"));
    return table(null, [[t("quarter")], [t("status")], [t("last_sync")], [t("behind"), "num"], [t("concerns"), "num"], [t("versions")]],
      quarters.map((q) => h("tr", { "data-quarter": q.slug },
        h("th", { scope: "row" }, q.name, h("div", { class: "muted" }, q.slug)),
        h("td", {}, q.connected ? badge(t("online"), "ok") : badge(t("offline"), "bad")),
        h("td", {}, fmtAgo(q.last_sync_ms)),
        h("td", { class: "num" }, q.lag_changes == null ? "–" : String(q.lag_changes)),
        h("td", { class: "num" }, String(q.concerns)),
        h("td", { class: "chips" }, Object.values(q.versions || {}).map((v) => h("span", {}, v))))));
  }

  function chips(map, translate) {
    const entries = Object.entries(map || {});
    if (!entries.length) return "–";
    return h("div", { class: "chips" }, entries.map(([k, n]) => h("span", {}, `${translate ? status(k) : k}: ${n}`)));
  }

  function overview(list, names) {
    if (!list.length) return h("p", { class: "empty" }, t("no_concerns"));
    return table(null, [[t("quarter")], [t("total"), "num"], [t("by_status")], [t("by_category")]],
      list.map((o) => h("tr", {},
        h("th", { scope: "row" }, names[o.quarter] || o.quarter),
        h("td", { class: "num" }, String(o.total)),
        h("td", {}, chips(o.by_status, true)),
        h("td", {}, chips(o.by_category, false)))));
  }

  function latest(concerns, names) {
    if (!concerns.length) return h("p", { class: "empty" }, t("no_concerns"));
    return table(null, [[t("created")], [t("quarter")], [t("category")], [t("description")], [t("status")]],
      concerns.slice(0, 12).map((c) => h("tr", { "data-concern": c.id },
        h("td", {}, fmtTime(c.created_ms)),
        h("td", {}, names[c.quarter] || c.quarter),
        h("td", {}, c.category),
        h("td", {}, c.description),
        h("td", {}, status(c.detailed_status || c.status)))));
  }

  function respondForm(e) {
    const id = `r-${e.quarter}-${e.escalation.id}`;
    const form = h("form", { class: "inline", "data-escalation": e.escalation.id, "aria-label": `${t("respond")}: ${e.item}` },
      h("label", { for: `${id}-d` }, t("decision"),
        h("select", { id: `${id}-d`, name: "decision" },
          ["accepted", "declined", "forwarded"].map((d) => h("option", { value: d }, t(d))))),
      h("label", { for: `${id}-dep` }, t("department"), h("input", { id: `${id}-dep`, name: "department", size: 18 })),
      h("label", { for: `${id}-n` }, t("note"), h("input", { id: `${id}-n`, name: "note", required: true, size: 24 })),
      h("button", { class: "primary", type: "submit" }, t("send")),
      h("div", { class: "status-msg", role: "status" }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      const department = String(f.get("department") || "").trim();
      submit(form, () => api("POST", "/api/v1/responses", {
        quarter: e.quarter, escalation: e.escalation.id, decision: f.get("decision"),
        department: department || null, note: String(f.get("note") || ""),
      }), refresh);
    });
    return form;
  }

  function inbox(entries, names) {
    if (!entries.length) return h("p", { class: "empty" }, t("inbox_empty"));
    const sorted = [...entries].sort((a, b) => a.escalation.at_ms - b.escalation.at_ms);
    return table(null, [[t("since")], [t("quarter")], [t("kind")], [t("item")], [t("reason")], [t("respond")]],
      sorted.map((e) => h("tr", { "data-escalation": e.escalation.id },
        h("td", {}, fmtTime(e.escalation.at_ms)),
        h("td", {}, names[e.quarter] || e.quarter),
        h("td", {}, t(e.escalation.kind)),
        h("td", {}, e.item),
        h("td", {}, e.escalation.reason),
        h("td", {}, respondForm(e)))));
  }

  function consultations(list, names) {
    if (!list.length) return h("p", { class: "empty" }, t("none"));
    return list.map((r) => {
      const c = r.consultation;
      return h("article", { class: "card" },
        h("h3", {}, c.question, " ", badge(t(c.status) || c.status, c.status === "open" ? "info" : "warn")),
        h("p", { class: "muted" }, `${t("deadline")}: ${fmtTime(c.deadline_ms)}`),
        table(null, [[t("option")], [t("quarters")], [t("yes"), "num"], [t("no"), "num"], [t("abstain"), "num"]],
          r.options.map((o) => h("tr", {},
            h("th", { scope: "row" }, o.option),
            h("td", {}, o.quarters.map((q) => names[q] || q).join(", ") || "–"),
            h("td", { class: "num" }, String(o.yes)),
            h("td", { class: "num" }, String(o.no)),
            h("td", { class: "num" }, String(o.abstain))))),
        r.missing.length
          ? h("p", {}, h("strong", {}, `${t("not_answered")}: `), r.missing.map((q) => names[q] || q).join(", "))
          : h("p", { class: "muted" }, t("all_answered")));
    });
  }

  function budget(lines, names) {
    if (!lines.length) return h("p", { class: "empty" }, t("none"));
    return table(null, [[t("year")], [t("quarter")], [t("frame"), "num"], [t("allocated"), "num"], [t("remaining"), "num"], [t("status")]],
      lines.map((b) => h("tr", {},
        h("td", {}, String(b.year)),
        h("th", { scope: "row" }, names[b.quarter] || b.quarter),
        h("td", { class: "num" }, fmtEuro(b.frame_cents)),
        h("td", { class: "num" }, fmtEuro(b.allocated_cents)),
        h("td", { class: "num" }, fmtEuro(b.remaining_cents)),
        h("td", {}, b.over_frame ? badge(t("over_frame"), "bad") : badge(t("within"), "ok")))));
  }

  function directives(list, names) {
    if (!list.length) return h("p", { class: "empty" }, t("none"));
    const nm = (q) => names[q] || q;
    return table(null, [[t("title")], [t("ack_due")], [t("acknowledged")], [t("pending")], [t("overdue")]],
      list.map((d) => h("tr", {},
        h("th", { scope: "row" }, d.directive.title, h("div", { class: "muted" }, d.directive.text)),
        h("td", {}, fmtDate(d.directive.ack_due_ms)),
        h("td", {}, Object.entries(d.acks).map(([q, a]) => h("div", {}, `${nm(q)}: ${t(a.state)}`))),
        h("td", {}, d.pending.map(nm).join(", ") || "–"),
        h("td", {}, d.overdue.length ? d.overdue.map((q) => badge(`${t("overdue")}: ${nm(q)}`, "bad")) : "–"))));
  }

  function render() {
    if (!last) return;
    const [st, quarters, ov, concerns, esc, cons, bud, dirs] = last;
    const names = Object.fromEntries(quarters.map((q) => [q.slug, q.name]));
    document.getElementById("whoami").textContent = st.peer_id.slice(0, 16) + "…";
    // Keep what an administrator is typing into a response: re-render the
    // inbox only when its set of escalations changed.
    const inboxKey = esc.map((e) => e.quarter + "/" + e.escalation.id).join(",") + IQ.lang;
    const inboxBody = document.querySelector("#inbox .body");
    if (inboxBody.dataset.key !== inboxKey) {
      fill("inbox", inbox(esc, names));
      inboxBody.dataset.key = inboxKey;
    }
    fill("federation", federation(quarters, names));
    fill("overview", overview(ov, names));
    fill("latest", latest(concerns, names));
    fill("consultations", consultations(cons, names));
    fill("budget", budget(bud, names));
    fill("directives", directives(dirs, names));
  }

  async function refresh() {
    last = await Promise.all([
      api("GET", "/api/v1/status"),
      api("GET", "/api/v1/quarters"),
      api("GET", "/api/v1/overview/concerns"),
      api("GET", "/api/v1/concerns"),
      api("GET", "/api/v1/escalations?open=true"),
      api("GET", "/api/v1/consultations"),
      api("GET", "/api/v1/budget"),
      api("GET", "/api/v1/directives"),
    ]);
    render();
  }

  IQ.applyLang();
  IQ.setupLangToggle(() => { document.querySelector("#inbox .body").dataset.key = ""; render(); });
  IQ.live(refresh);
  // Relative times ("12 s ago") stay current between changes.
  setInterval(render, 15000);
})();
