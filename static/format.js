// Small helpers shared by the page's views: figures as people read them, and elements.

export function gb(value) {
  return value == null ? "–" : `${Number(value).toFixed(2)} GB`;
}

// 1 -> "1", 2.14 -> "2.1", 0.063 -> "0.063": seconds as people read them.
export function secs(value) {
  return String(Number(Number(value).toPrecision(2)));
}

// A time of day as HH:MM:SS, local, 24-hour: the same on every browser locale.
export function clock(when) {
  const date = when instanceof Date ? when : new Date(when);
  return [date.getHours(), date.getMinutes(), date.getSeconds()]
    .map((part) => String(part).padStart(2, "0"))
    .join(":");
}

export function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

// An element with a class and text; text is always set as text, never as HTML.
export function element(tag, className = "", text = "") {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text) made.textContent = text;
  return made;
}

// Sets a property only when it changes: a MutationObserver (the tests') or a
// screen reader sees real changes only, and a hovered title is not reset.
export function setIfChanged(target, property, value) {
  if (target[property] !== value) target[property] = value;
}
