// The app shell: sign-in gate, navigation bar, router.
import { clearKey, getKey, onUnauthorized } from "./api";
import { h, replace } from "./dom";
import { overviewPage } from "./pages/overview";
import { poolsPage } from "./pages/pools";
import { sandboxPage } from "./pages/sandbox";
import { sandboxesPage } from "./pages/sandboxes";
import { signInPage } from "./pages/signin";
import { templatePage } from "./pages/template";
import { templatesPage } from "./pages/templates";
import { volumesPage } from "./pages/volumes";
import { PageContext, type Route, current, href, navigate, setRoutes, startRouter } from "./router";

const NAV: { id: string; label: string; path: string }[] = [
  { id: "sandboxes", label: "Sandboxes", path: "/sandboxes" },
  { id: "templates", label: "Templates", path: "/templates" },
  { id: "pools", label: "Warm pools", path: "/pools" },
  { id: "volumes", label: "Volumes", path: "/volumes" },
  { id: "overview", label: "Overview", path: "/overview" },
];

const ROUTES: Route[] = [
  { pattern: /^\/sandboxes$/, nav: "sandboxes", page: sandboxesPage },
  { pattern: /^\/sandboxes\/([^/]+)$/, nav: "sandboxes", page: sandboxPage },
  { pattern: /^\/templates$/, nav: "templates", page: templatesPage },
  { pattern: /^\/templates\/([^/]+)$/, nav: "templates", page: templatePage },
  { pattern: /^\/pools$/, nav: "pools", page: poolsPage },
  { pattern: /^\/volumes$/, nav: "volumes", page: volumesPage },
  { pattern: /^\/overview$/, nav: "overview", page: overviewPage },
];

const app = document.getElementById("app") ?? document.body;
let ctx: PageContext | null = null;
let signInMessage: string | null = null;

function notFound(root: HTMLElement): void {
  replace(
    root,
    h("h1", null, "Page not found"),
    h("p", null, "There is no dashboard page at this address. "),
    h("p", null, h("a", { href: href("/sandboxes") }, "Go to the sandboxes")),
  );
}

function shell(activeNav: string): HTMLElement {
  const main = h("main", { id: "main", class: "main", tabindex: -1 });
  const signOut = h("button", { type: "button", class: "btn btn-small", "data-testid": "sign-out" }, "Sign out");
  signOut.addEventListener("click", () => {
    clearKey();
    signInMessage = "Signed out.";
    current();
  });
  const nav = h(
    "nav",
    { class: "nav", "aria-label": "Main" },
    h("a", { class: "brand", href: href("/sandboxes") }, "Nullspace"),
    h(
      "ul",
      { class: "nav-links" },
      ...NAV.map((n) =>
        h(
          "li",
          null,
          h(
            "a",
            {
              href: href(n.path),
              class: n.id === activeNav ? "active" : "",
              "aria-current": n.id === activeNav ? "page" : null,
              "data-testid": `nav-${n.id}`,
            },
            n.label,
          ),
        ),
      ),
    ),
    signOut,
  );
  replace(app, h("a", { class: "skip", href: "#main" }, "Skip to content"), h("header", { class: "topbar" }, nav), main);
  return main;
}

function render(route: Route | null, params: string[]): void {
  // A confirmation left open answers "cancel": its action belongs to the page being left.
  for (const d of document.querySelectorAll<HTMLDialogElement>("dialog[open]")) d.close();
  ctx?.dispose();
  ctx = new PageContext();
  if (!getKey()) {
    const msg = signInMessage;
    signInMessage = null;
    signInPage(app, ctx, msg, () => current());
    document.title = "Sign in — Nullspace";
    return;
  }
  const main = shell(route?.nav ?? "");
  if (route) route.page(main, ctx, params);
  else notFound(main);
}

onUnauthorized((message) => {
  signInMessage = message;
  current();
});

setRoutes(ROUTES, (root) => notFound(root), render);
if (location.pathname === "/dashboard" || location.pathname === "/dashboard/") navigate("/sandboxes", true);
startRouter();
