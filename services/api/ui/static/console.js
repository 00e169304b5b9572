// crgate console: the session's CSRF token on every change, problem JSON shown as text,
// job and sweep progress polled, keys created and revoked, destinations echoed.
"use strict";

const crgate = {
  csrf() { return document.querySelector("meta[name=csrf-token]").content; },

  async call(method, url, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (method !== "GET") init.headers["X-CSRF-Token"] = crgate.csrf();
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    return data;
  },

  problem(error) {
    const box = document.getElementById("problem");
    box.textContent = error ? String(error.message || error) : "";
    box.hidden = !error;
  },

  async follow(url, onUpdate) {  // poll a job or sweep until it is done
    for (;;) {
      const view = await crgate.call("GET", url);
      onUpdate(view);
      if (view.status === "succeeded" || view.status === "failed") return view;
      await new Promise(r => setTimeout(r, 1000));
    }
  },
};

function pollRows() {
  document.querySelectorAll("tr[data-job], tr[data-sweep]").forEach(row => {
    if (!["queued", "running"].includes(row.dataset.status)) return;
    const url = row.dataset.job ? `/jobs/${row.dataset.job}` : `/sweeps/${row.dataset.sweep}`;
    crgate.follow(url, view => {
      row.dataset.status = view.status;
      row.querySelector(".js-status").innerHTML = "";
      const badge = document.createElement("span");
      badge.className = `status ${view.status}`;
      badge.textContent = view.status;
      row.querySelector(".js-status").append(badge);
      const p = view.progress;
      const cell = row.querySelector(".js-progress");
      if (row.dataset.job) {
        cell.innerHTML = `<progress max="${p.total || 1}" value="${p.done}"></progress> `;
        cell.append(`${p.done}/${p.total}`);
        row.querySelector(".js-reason").textContent = view.reason || "";
        if (view.result_id) {
          const link = document.createElement("a");
          link.href = `/ui/studies/${view.study_uid}?result=${view.result_id}`;
          link.textContent = "open";
          row.querySelector(".js-result").replaceChildren(link);
        }
      } else {
        cell.textContent = `${p.done}/${p.total} ${p.what || ""}`;
        if (view.report_url) {
          const link = document.createElement("a");
          link.href = view.report_url;
          link.textContent = "report";
          row.querySelector(".js-result").replaceChildren(link);
        }
      }
    }).catch(crgate.problem);
  });
}

function keys() {
  const form = document.getElementById("new-key");
  if (!form) return;
  form.addEventListener("submit", async event => {
    event.preventDefault();
    crgate.problem(null);
    try {
      const made = await crgate.call("POST", "/keys", {
        name: document.getElementById("key-name").value,
        role: document.getElementById("key-role").value,
      });
      document.getElementById("created-key").textContent = made.key;
      document.getElementById("created").hidden = false;
      const row = document.createElement("tr");
      row.dataset.key = made.id;
      for (const text of [made.id, made.prefix, made.name, made.role, "now", "never", ""]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.dataset.revoke = made.id;
      revoke.textContent = "Revoke";
      revoke.setAttribute("aria-label", `Revoke key ${made.prefix} (${made.name})`);
      row.lastChild.append(revoke);
      document.querySelector("table.keys tbody").append(row);
    } catch (error) { crgate.problem(error); }
  });
  document.querySelector("table.keys").addEventListener("click", async event => {
    const id = event.target.dataset && event.target.dataset.revoke;
    if (!id) return;
    crgate.problem(null);
    try {
      const row = await crgate.call("DELETE", `/keys/${id}`);
      event.target.parentElement.textContent = `revoked ${row.revoked_at.slice(0, 16).replace("T", " ")}`;
    } catch (error) { crgate.problem(error); }
  });
}

function destinations() {
  document.querySelectorAll("button[data-echo]").forEach(button => {
    button.addEventListener("click", async () => {
      const out = document.querySelector(`output[data-echo-out="${button.dataset.echo}"]`);
      out.textContent = "...";
      crgate.problem(null);
      try {
        const echo = await crgate.call("POST", `/destinations/${button.dataset.echo}/echo`);
        const note = echo.error ? ` (${echo.error})` : "";
        out.textContent = echo.reachable ? `reachable, ${echo.rtt_ms} ms${note}` : `unreachable: ${echo.error}`;
      } catch (error) { out.textContent = ""; crgate.problem(error); }
    });
  });
}

function forwards() {  // re-send what a destination refused (operator)
  document.querySelectorAll("button[data-resend]").forEach(button => {
    button.addEventListener("click", async () => {
      crgate.problem(null);
      try {
        await crgate.call("POST", `/forwards/${button.dataset.resend}/resend`);
        location.reload();
      } catch (error) { crgate.problem(error); }
    });
  });
  const all = document.querySelector("button[data-resend-all]");
  if (all) all.addEventListener("click", async () => {
    crgate.problem(null);
    try {
      await crgate.call("POST", "/forwards:resend?state=failed");
      location.reload();
    } catch (error) { crgate.problem(error); }
  });
}

function sweeps() {
  const form = document.getElementById("new-sweep");
  if (!form) return;
  form.addEventListener("submit", async event => {
    event.preventDefault();
    crgate.problem(null);
    try {
      const started = await crgate.call("POST", "/studies:cr-sweep", document.getElementById("sweep-body").value);
      document.getElementById("sweep-out").textContent = `started ${started.sweep.id}`;
      setTimeout(() => location.reload(), 500);
    } catch (error) { crgate.problem(error); }
  });
}

function presets() {
  document.querySelectorAll("button[data-preset]").forEach(button => {
    button.addEventListener("click", async () => {
      crgate.problem(null);
      try {
        await crgate.call("POST", `/policies/presets/${encodeURIComponent(button.dataset.preset)}`);
        location.reload();
      } catch (error) { crgate.problem(error); }
    });
  });
}

function policyBody(form) {  // what the policy form says, as the API's PolicyIn / PolicyUpdate
  const checked = name => [...form.querySelectorAll(`input[name=${name}]:checked`)].map(i => i.value);
  const body = {
    cr: Number(form.elements.cr.value),
    syntax: form.elements.syntax.value,
    auto_classify: form.elements.auto_classify.checked,
    auto_compress: form.elements.auto_compress.checked,
    keep_copy: form.elements.keep_copy.checked,
    forward_to: checked("forward_to"),
    forward_what: checked("forward_what"),
    expected_instances: form.elements.expected_instances.value ? Number(form.elements.expected_instances.value) : null,
    quiet_seconds: Number(form.elements.quiet_seconds.value),
  };
  const reason = form.elements.override_reason.value.trim();
  if (reason) body.override_reason = reason;
  return body;
}

function policies() {
  const created = document.getElementById("new-policy");
  if (created) {
    created.addEventListener("submit", async event => {
      event.preventDefault();
      crgate.problem(null);
      const body = policyBody(created);
      body.modality = created.elements.modality.value.trim();
      body.body_part = created.elements.body_part.value.trim() || "*";
      const age = created.elements.pediatric.value;
      body.pediatric = age === "" ? null : age === "true";
      try {
        await crgate.call("POST", "/policies", body);
        location.reload();
      } catch (error) { crgate.problem(error); }
    });
  }
  document.querySelectorAll("form.policy-edit").forEach(form => {
    form.addEventListener("submit", async event => {
      event.preventDefault();
      crgate.problem(null);
      try {
        await crgate.call("PUT", `/policies/${form.dataset.policy}`, policyBody(form));
        location.reload();
      } catch (error) { crgate.problem(error); }
    });
  });
  document.querySelectorAll("button[data-delete-policy]").forEach(button => {
    button.addEventListener("click", async () => {
      crgate.problem(null);
      if (!confirm(`Delete policy ${button.dataset.deletePolicy}? Its studies fall under the next matching policy.`)) return;
      try {
        await crgate.call("DELETE", `/policies/${button.dataset.deletePolicy}`);
        location.reload();
      } catch (error) { crgate.problem(error); }
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  pollRows();
  policies();
  presets();
  keys();
  destinations();
  forwards();
  sweeps();
});
