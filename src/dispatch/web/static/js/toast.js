// Announced messages (the container is role="status"): what an action did, or why not.

const SHOWN_MS = 8000;

export function toast(text, { kind = "info", link = null } = {}) {
  const box = document.getElementById("toasts");
  const item = document.createElement("div");
  item.className = "toast";
  item.dataset.kind = kind;
  item.append(text);
  if (link) {
    item.append(" ");
    const a = document.createElement("a");
    a.href = link.href;
    a.textContent = link.text;
    item.append(a);
  }
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? SHOWN_MS * 2 : SHOWN_MS);
  return item;
}
