// Light and dark: the system's preference until the learner picks one with the toggle (remembered).

const THEME_KEY = "newbie-app.theme";
const $ = (id) => document.getElementById(id);

function systemTheme() {
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hljs-light").disabled = theme === "dark";
  $("hljs-dark").disabled = theme !== "dark";
  $("theme-toggle").setAttribute("aria-pressed", String(theme === "dark"));
}

/** Apply the remembered or system theme and wire the toggle. */
export function initTheme() {
  applyTheme(localStorage.getItem(THEME_KEY) || systemTheme());
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    if (!localStorage.getItem(THEME_KEY)) applyTheme(systemTheme());
  });
  $("theme-toggle").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem(THEME_KEY, next);
    applyTheme(next);
  });
}
