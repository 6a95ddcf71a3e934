// The quarter office's page: record and move on concerns, see proposals and
// supports, answer consultations, acknowledge directives, and see the
// centre's responses. Refreshed whenever the node's replicas change.
"use strict";
(() => {
  const { t, h, table, api, fmtTime, fmtDate, badge, status, fill, submit } = IQ;
  let slug = null;
  let last = null;
  // Forms being typed into are not replaced by a refresh.
  const busy = () => document.activeElement && document.activeElement.closest("main form:not(#concern-form)");

  function notes(c) {
    if (!c.notes.length) return null;
    return h("ul", { class: "notes", "aria-label": t("notes") },
      c.notes.map((n) => h("li", { class: n.by === "centre" ? "centre" : "" },
        `${fmtTime(n.at_ms)} · ${n.by === "centre" ? t("by_centre") + ": " : ""}${status(n.status)}${n.note ? " – " + n.note : ""}`)));
  }

  function statusForm(c) {
    const id = `s-${c.id}`;
    const form = h("form", { class: "inline", "aria-label": `${t("update")}: ${c.description}` },
      h("label", { for: `${id}-s` }, t("status"),
        h("select", { id: `${id}-s`, name: "status" },
          ["received", "in_process", "processed", "rejected"].map((s) =>
            h("option", { value: s, selected: (c.detailed_status || "received") === s }, t(s))))),
      h("label", { for: `${id}-n` }, t("note"), h("input", { id: `${id}-n`, name: "note", size: 18 })),
      h("button", { class: "primary", type: "submit" }, t("update")),
      h("div", { class: "status-msg", role: "status" }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      submit(form, () => api("POST", `/api/v1/concerns/${encodeURIComponent(c.id)}/status`,
        { status: f.get("status"), note: String(f.get("note") || "") }), refresh);
    });
    return form;
  }

  function concerns(list) {
    if (!list.length) return h("p", { class: "empty" }, t("no_concerns"));
    return table(null, [[t("created")], [t("category")], [t("description")], [t("status")], [t("update")]],
      list.map((c) => h("tr", { "data-concern": c.id },
        h("td", {}, fmtTime(c.created_ms)),
        h("td", {}, c.category),
        h("td", {}, c.description, c.address ? h("div", { class: "muted" }, c.address) : null, notes(c)),
        h("td", {}, badge(status(c.detailed_status || c.status), c.status === "open" ? "info" : "ok")),
        h("td", {}, statusForm(c)))));
  }

  function escalations(list) {
    if (!list.length) return h("p", { class: "empty" }, t("none"));
    return table(null, [[t("item")], [t("reason")], [t("response")]],
      list.map((e) => h("tr", { "data-escalation": e.escalation.id },
        h("td", {}, e.item, h("div", { class: "muted" }, `${t(e.escalation.kind)} · ${fmtTime(e.escalation.at_ms)}`)),
        h("td", {}, e.escalation.reason),
        h("td", { class: "response" }, e.response
          ? [badge(t(e.response.decision) || e.response.decision, e.response.decision === "declined" ? "bad" : "ok"),
             e.response.department ? ` → ${e.response.department}` : "",
             h("div", {}, e.response.note)]
          : badge(t("awaiting"), "warn")))));
  }

  function answerForm(r) {
    const c = r.consultation;
    const id = `a-${c.id}`;
    const form = h("form", { class: "stack", "aria-label": `${t("answer")}: ${c.question}` },
      h("label", { for: `${id}-o` }, t("option"),
        h("select", { id: `${id}-o`, name: "option" }, c.options.map((o) => h("option", { value: o }, o)))),
      h("label", { for: `${id}-b` }, t("body"), h("input", { id: `${id}-b`, name: "body", required: true })),
      h("label", { for: `${id}-p`, class: "full" }, t("position"), h("textarea", { id: `${id}-p`, name: "position", required: true })),
      h("label", { for: `${id}-y` }, t("yes"), h("input", { id: `${id}-y`, name: "yes", type: "number", min: 0, value: 0 })),
      h("label", { for: `${id}-n` }, t("no"), h("input", { id: `${id}-n`, name: "no", type: "number", min: 0, value: 0 })),
      h("label", { for: `${id}-a` }, t("abstain"), h("input", { id: `${id}-a`, name: "abstain", type: "number", min: 0, value: 0 })),
      h("div", { class: "full" }, h("button", { class: "primary", type: "submit" }, t("submit")),
        h("span", { class: "status-msg", role: "status" })));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      submit(form, () => api("POST", `/api/v1/consultations/${encodeURIComponent(c.id)}/answer`, {
        options: [f.get("option")], position: String(f.get("position") || ""), body: String(f.get("body") || ""),
        yes: Number(f.get("yes")) || 0, no: Number(f.get("no")) || 0, abstain: Number(f.get("abstain")) || 0,
      }), refresh);
    });
    return form;
  }

  function consultations(list) {
    const mine = list.filter((r) => !r.consultation.targets.length || r.consultation.targets.includes(slug));
    if (!mine.length) return h("p", { class: "empty" }, t("none"));
    return mine.map((r) => {
      const c = r.consultation;
      const ours = r.answers[slug];
      return h("article", { class: "card" },
        h("h3", {}, c.question, " ", badge(t(c.status) || c.status, c.status === "open" ? "info" : "warn")),
        h("p", { class: "muted" }, `${t("deadline")}: ${fmtTime(c.deadline_ms)}`),
        ours ? h("p", {}, badge(t("answered"), "ok"), ` ${ours.options.join(", ")} – ${ours.position}`)
          : (c.status === "open" ? answerForm(r) : null));
    });
  }

  function ackForm(d) {
    const id = `k-${d.directive.id}`;
    const form = h("form", { class: "inline", "aria-label": `${t("acknowledge")}: ${d.directive.title}` },
      h("label", { for: `${id}-s` }, t("state"),
        h("select", { id: `${id}-s`, name: "state" }, ["received", "implemented"].map((s) => h("option", { value: s }, t(s))))),
      h("label", { for: `${id}-c` }, t("comment"), h("input", { id: `${id}-c`, name: "comment", size: 16 })),
      h("button", { class: "primary", type: "submit" }, t("acknowledge")),
      h("div", { class: "status-msg", role: "status" }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      submit(form, () => api("POST", `/api/v1/directives/${encodeURIComponent(d.directive.id)}/ack`,
        { state: f.get("state"), comment: String(f.get("comment") || "") }), refresh);
    });
    return form;
  }

  function directives(list) {
    const mine = list.filter((d) => !d.directive.targets.length || d.directive.targets.includes(slug));
    if (!mine.length) return h("p", { class: "empty" }, t("none"));
    return mine.map((d) => {
      const ack = d.acks[slug];
      const overdue = d.overdue.includes(slug);
      return h("article", { class: "card" },
        h("h3", {}, d.directive.title, " ", overdue ? badge(t("overdue"), "bad") : null),
        h("p", {}, d.directive.text),
        h("p", { class: "muted" }, `${t("ack_due")}: ${fmtDate(d.directive.ack_due_ms)}`),
        ack ? h("p", {}, `${t("your_ack")}: `, badge(t(ack.state), "ok"), ack.comment ? ` – ${ack.comment}` : "") : null,
        ack && ack.state === "implemented" ? null : ackForm(d));
    });
  }

  function proposals(list) {
    if (!list.length) return h("p", { class: "empty" }, t("none"));
    return table(null, [[t("title")], [t("status")], [t("supports"), "num"], [t("threshold"), "num"]],
      list.map((p) => h("tr", {},
        h("th", { scope: "row" }, p.title, h("div", { class: "muted" }, p.description)),
        h("td", {}, p.status),
        h("td", { class: "num" }, String(Object.keys(p.supports || {}).length)),
        h("td", { class: "num" }, String(p.threshold)))));
  }

  let deferred = false;
  function render(force) {
    if (!last) return;
    if (!force && busy()) {
      // Re-render once the user leaves the form they are typing into.
      if (!deferred) {
        deferred = true;
        document.addEventListener("focusout", () => setTimeout(() => { deferred = false; render(false); }, 0), { once: true });
      }
      return;
    }
    const [st, cs, esc, cons, dirs, props] = last;
    document.getElementById("quarter-name").textContent = slug;
    const up = st.peers.filter((p) => p.connected).length;
    document.getElementById("peers").textContent = `${up} ${t("peers")}`;
    fill("concerns", concerns(cs));
    fill("escalations", escalations(esc));
    fill("proposals", proposals(props));
    fill("consultations", consultations(cons));
    fill("directives", directives(dirs));
  }

  async function refresh() {
    const st = await api("GET", "/api/v1/status");
    slug = st.own_doc.replace(/^quarter\//, "");
    const q = encodeURIComponent(slug);
    const rest = await Promise.all([
      api("GET", `/api/v1/concerns?quarter=${q}`),
      api("GET", `/api/v1/escalations?quarter=${q}`),
      api("GET", "/api/v1/consultations"),
      api("GET", "/api/v1/directives"),
      api("GET", `/api/v1/proposals?quarter=${q}`),
    ]);
    last = [st, ...rest];
    render(false);
  }

  const form = document.getElementById("concern-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const address = String(f.get("address") || "").trim();
    submit(form, async () => {
      await api("POST", "/api/v1/concerns", {
        category: String(f.get("category") || ""), description: String(f.get("description") || ""),
        address: address || null,
      });
      form.reset();
    }, refresh);
  });

  IQ.applyLang();
  IQ.setupLangToggle(() => render(true));
  IQ.live(refresh);
})();
