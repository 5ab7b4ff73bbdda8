// A unified diff split by file, with its +/- counts; the patch opens on a click.

export function parse(text) {
  const files = [];
  let current = null;
  for (const line of text.split("\n")) {
    if (line.startsWith("diff --git ")) {
      const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
      current = { path: m ? m[2] : line.slice(11), lines: [line], added: 0, removed: 0 };
      files.push(current);
      continue;
    }
    if (!current) continue;
    current.lines.push(line);
    if (line.startsWith("+++ ") && line !== "+++ /dev/null") current.path = line.slice(4).replace(/^b\//, "");
    else if (line.startsWith("+") && !line.startsWith("+++")) current.added += 1;
    else if (line.startsWith("-") && !line.startsWith("---")) current.removed += 1;
  }
  return files;
}

export function render(box, text) {
  const files = parse(text);
  box.replaceChildren();
  if (!files.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No changes.";
    box.append(p);
    return { files: 0, added: 0, removed: 0 };
  }
  for (const f of files) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const plus = document.createElement("span");
    plus.className = "plus";
    plus.textContent = `+${f.added}`;
    const minus = document.createElement("span");
    minus.className = "minus";
    minus.textContent = `−${f.removed}`;
    summary.append(f.path, plus, minus);
    details.append(summary);
    details.addEventListener("toggle", () => {
      if (!details.open || details.querySelector("pre")) return;
      const pre = document.createElement("pre"); // built on first open: big diffs stay cheap
      for (const line of f.lines) {
        const span = document.createElement("span");
        if (line.startsWith("@@")) span.className = "hunk";
        else if (line.startsWith("+") && !line.startsWith("+++")) span.className = "add";
        else if (line.startsWith("-") && !line.startsWith("---")) span.className = "del";
        span.textContent = line || " ";
        pre.append(span);
      }
      details.append(pre);
    });
    box.append(details);
  }
  return {
    files: files.length,
    added: files.reduce((n, f) => n + f.added, 0),
    removed: files.reduce((n, f) => n + f.removed, 0),
  };
}
