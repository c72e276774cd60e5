// The gallery of a PET-VLM run report: sort, filter, paginate and compare the samples embedded in the page.
// No network, no libraries: the data is the JSON of #report-data; only the rows of one page are in the DOM.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const galleries = DATA.galleries;
  if (!galleries.length) return;
  const $ = (id) => document.getElementById(id);
  const state = { gallery: 0, compare: -1, sortKey: "score", ascending: true, page: 0, pageSize: 50,
                  filters: {}, search: "" };

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "cls") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function image(index, cls) {
    if (index === null || index === undefined) return el("span", { cls: "noimg " + cls, text: "no image" });
    return el("img", { src: DATA.images[index], cls: cls, alt: "", loading: "eager" });
  }

  function fmt(score) { return score === null || score === undefined ? "–" : (+score).toFixed(2); }

  function option(select, value, label) { select.appendChild(el("option", { value: value, text: label })); }

  function targetCell(target) {
    // Distinct references one per line; ten VQA answers read better as "yes ×7, no ×3".
    const counts = new Map();
    for (const t of target) counts.set(t, (counts.get(t) || 0) + 1);
    const cell = el("td", { cls: "target" });
    if (counts.size === target.length) {
      for (const t of target) cell.appendChild(el("div", { cls: "ref", text: t }));
    } else {
      cell.textContent = [...counts.entries()].sort((a, b) => b[1] - a[1]).map(([t, n]) => n > 1 ? `${t} ×${n}` : t).join(", ");
    }
    return cell;
  }

  function compareRows() {
    if (state.compare < 0) return null;
    const byId = new Map();
    for (const row of galleries[state.compare].rows) byId.set(String(row.id), row);
    return byId;
  }

  function visibleRows() {
    const g = galleries[state.gallery];
    const other = compareRows();
    const needle = state.search.toLowerCase();
    let rows = g.rows.filter((row) => {
      for (const [key, value] of Object.entries(state.filters)) if (value && String(row[key]) !== value) return false;
      if (other && !other.has(String(row.id))) return false;
      if (needle) {
        const hay = [row.pred, row.question, DATA.texts[row.q], ...row.target].join(" ").toLowerCase();
        if (!hay.includes(needle)) return false;
      }
      return true;
    });
    const value = (row) => {
      if (state.sortKey === "id") return row.id;
      if (state.sortKey === "delta") {
        const b = other.get(String(row.id));
        return row.score === null || b.score === null ? null : b.score - row.score;
      }
      return row.score;
    };
    const sign = state.ascending ? 1 : -1;
    rows = rows.slice().sort((a, b) => {
      const va = value(a), vb = value(b);
      if (va === null || va === undefined) return vb === null || vb === undefined ? 0 : 1;  // unscored last
      if (vb === null || vb === undefined) return -1;
      return va < vb ? -sign : va > vb ? sign : 0;
    });
    return rows;
  }

  function demoCell(row) {
    const cell = el("td", { cls: "demos" });
    if (!row.demos.length) { cell.appendChild(el("span", { cls: "muted", text: "none" })); return cell; }
    const list = el("div", { cls: "demo-list" });
    for (const [img, text] of row.demos) {
      list.appendChild(el("div", { cls: "demo" }, [image(img, "demo-img"), el("div", { cls: "demo-text", text: DATA.texts[text] })]));
    }
    cell.appendChild(list);
    return cell;
  }

  function predictionCell(row, cls) {
    const cell = el("td", { cls: cls });
    cell.appendChild(el("div", { cls: "pred", text: row.pred === null ? "–" : row.pred }));
    if (row.raw !== null && row.raw !== row.pred) cell.appendChild(el("div", { cls: "raw", text: "raw: " + row.raw }));
    return cell;
  }

  function render() {
    const g = galleries[state.gallery];
    const other = compareRows();
    const rows = visibleRows();
    const pages = Math.max(1, Math.ceil(rows.length / state.pageSize));
    state.page = Math.min(state.page, pages - 1);
    const head = $("gallery-head");
    head.textContent = "";
    const arrow = (key) => state.sortKey === key ? (state.ascending ? " ▲" : " ▼") : "";
    const headers = [["#", "id"], ["image", null], ["demonstrations", null], ["prompt (query)", null],
                     [other ? `prediction (${g.run})` : "prediction", null], ["references / answers", null],
                     [`score: ${g.score_key || "none"}`, "score"]];
    if (other) {
      const b = galleries[state.compare];
      headers.push([`prediction (${b.run})`, null], [`score (${b.run})`, null], [`Δ (${b.run} − ${g.run})`, "delta"]);
    }
    const tr = el("tr");
    for (const [label, key] of headers) {
      const th = el("th", { text: label + (key ? arrow(key) : "") });
      if (key) {
        th.id = "sort-" + key;
        th.className = "sortable";
        th.addEventListener("click", () => {
          state.ascending = state.sortKey === key ? !state.ascending : true;
          state.sortKey = key;
          state.page = 0;
          render();
        });
      }
      tr.appendChild(th);
    }
    head.appendChild(tr);

    const body = $("gallery-body");
    body.textContent = "";
    for (const row of rows.slice(state.page * state.pageSize, (state.page + 1) * state.pageSize)) {
      const queryCell = el("td", { cls: "query" }, [el("div", { cls: "prompt", text: DATA.texts[row.q] })]);
      const tags = [row.answer_type, row.question_type].filter((t) => t !== undefined);
      if (tags.length) queryCell.appendChild(el("div", { cls: "tags", text: tags.join(" · ") }));
      const scoreCell = el("td", { cls: "score", text: fmt(row.score) });
      if (row.scores) scoreCell.title = Object.entries(row.scores).map(([k, v]) => `${k}: ${fmt(v)}`).join("\n");
      const cells = [el("td", { cls: "id", text: String(row.id) }), el("td", {}, [image(row.img, "query-img")]),
                     demoCell(row), queryCell, predictionCell(row, "prediction"),
                     targetCell(row.target), scoreCell];
      if (other) {
        const b = other.get(String(row.id));
        cells.push(predictionCell(b, "prediction-b"), el("td", { cls: "score-b", text: fmt(b.score) }),
                   el("td", { cls: "delta", text: row.score === null || b.score === null ? "–" : fmt(b.score - row.score) }));
      }
      body.appendChild(el("tr", { cls: "row", "data-id": String(row.id), "data-score": row.score === null ? "" : String(row.score) }, cells));
    }
    const mean = rows.filter((r) => r.score !== null);
    const avg = mean.length ? mean.reduce((s, r) => s + r.score, 0) / mean.length : null;
    $("gallery-info").textContent = `${rows.length} of ${g.rows.length} samples · mean ${g.score_key || "score"} ${fmt(avg)} · ` +
      `page ${state.page + 1} of ${pages} · file ${g.file}`;
    $("prev-page").disabled = state.page === 0;
    $("next-page").disabled = state.page >= pages - 1;
  }

  function setupFilters() {
    const g = galleries[state.gallery];
    const box = $("gallery-filters");
    box.textContent = "";
    state.filters = {};
    for (const [key, values] of Object.entries(g.filters)) {
      const select = el("select", { id: "filter-" + key });
      option(select, "", `all ${key.replace("_", " ")}s`);
      for (const v of values) option(select, v, v);
      select.addEventListener("change", () => { state.filters[key] = select.value; state.page = 0; render(); });
      box.appendChild(el("label", { text: key.replace("_", " ") + " " }, [select]));
    }
  }

  function setupCompare() {
    const g = galleries[state.gallery];
    const select = $("gallery-compare");
    select.textContent = "";
    option(select, "-1", "no comparison");
    galleries.forEach((other, i) => {
      if (i !== state.gallery && other.dataset === g.dataset && other.split === g.split) option(select, String(i), `${other.run}: ${other.title}`);
    });
    // A compared run's counterpart of this gallery (same data, shots and trial) is the default comparison.
    const twin = galleries.findIndex((o) => o.run_index !== g.run_index && o.group === g.group && o.trial === g.trial);
    state.compare = DATA.compare_default && twin >= 0 && g.run_index === 0 ? twin : -1;
    select.value = String(state.compare);
  }

  function selectGallery(index) {
    state.gallery = index;
    state.page = 0;
    state.sortKey = "score";
    state.ascending = true;
    setupFilters();
    setupCompare();
    render();
  }

  const chooser = $("gallery-select");
  galleries.forEach((g, i) => option(chooser, String(i), `${g.run}: ${g.title} (${g.rows.length})`));
  chooser.addEventListener("change", () => selectGallery(+chooser.value));
  $("gallery-compare").addEventListener("change", () => {
    state.compare = +$("gallery-compare").value;
    state.page = 0;
    render();
  });
  $("gallery-search").addEventListener("input", (e) => { state.search = e.target.value; state.page = 0; render(); });
  $("page-size").addEventListener("change", (e) => { state.pageSize = +e.target.value; state.page = 0; render(); });
  $("prev-page").addEventListener("click", () => { state.page -= 1; render(); });
  $("next-page").addEventListener("click", () => { state.page += 1; render(); });
  selectGallery(0);
})();
