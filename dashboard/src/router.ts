// History-API routing under /dashboard/, and the per-page lifetime (timers, sockets and
// requests that end when the user leaves the page).

export const BASE = "/dashboard";

/** What a page (or a tab inside one) owns; dispose() ends all of it. */
export class PageContext {
  private readonly controller = new AbortController();
  private cleanups: (() => void)[] = [];

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  get alive(): boolean {
    return !this.controller.signal.aborted;
  }

  onCleanup(fn: () => void): void {
    if (!this.alive) fn();
    else this.cleanups.push(fn);
  }

  /** Runs `fn` every `ms` while the page is open and the browser tab is visible. */
  every(ms: number, fn: () => void | Promise<void>): void {
    let running = false;
    const tick = async () => {
      if (running || document.hidden || !this.alive) return;
      running = true;
      try {
        await fn();
      } catch {
        // each page shows its own errors
      } finally {
        running = false;
      }
    };
    const t = window.setInterval(tick, ms);
    const vis = () => {
      if (!document.hidden) void tick();
    };
    document.addEventListener("visibilitychange", vis);
    this.onCleanup(() => {
      window.clearInterval(t);
      document.removeEventListener("visibilitychange", vis);
    });
  }

  /** A context that ends with this one (or earlier). */
  child(): PageContext {
    const c = new PageContext();
    this.onCleanup(() => c.dispose());
    return c;
  }

  dispose(): void {
    if (!this.alive) return;
    this.controller.abort();
    const fns = this.cleanups.reverse();
    this.cleanups = [];
    for (const fn of fns) {
      try {
        fn();
      } catch {
        // keep disposing the rest
      }
    }
  }
}

export type Page = (root: HTMLElement, ctx: PageContext, params: string[]) => void;

export interface Route {
  pattern: RegExp;
  nav: string;
  page: Page;
}

let routes: Route[] = [];
let notFound: Page = () => undefined;
let render: (route: Route | null, params: string[]) => void = () => undefined;

export function setRoutes(r: Route[], fallback: Page, onRoute: (route: Route | null, params: string[]) => void): void {
  routes = r;
  notFound = fallback;
  render = onRoute;
}

export function notFoundPage(): Page {
  return notFound;
}

/** The route of the current location (path after /dashboard). */
export function match(pathname: string): { route: Route | null; params: string[] } {
  let rest = pathname.startsWith(BASE) ? pathname.slice(BASE.length) : pathname;
  if (rest === "" || rest === "/") rest = "/sandboxes";
  rest = rest.replace(/\/+$/, "");
  for (const route of routes) {
    const m = route.pattern.exec(rest);
    if (m) return { route, params: m.slice(1).map((s) => decodeURIComponent(s)) };
  }
  return { route: null, params: [] };
}

/** The path last rendered: a change of the fragment only (the skip link, "#new-sandbox")
 * fires popstate too, and must not re-render (and reset) the page. */
let renderedPath: string | null = null;

export function current(): void {
  const { route, params } = match(location.pathname);
  renderedPath = location.pathname;
  render(route, params);
}

/** Goes to a dashboard path (e.g. "/sandboxes/sbx-1"). */
export function navigate(path: string, replaceState = false): void {
  const url = path.startsWith(BASE) ? path : BASE + path;
  if (replaceState) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  current();
  window.scrollTo(0, 0);
}

/** Same-app links navigate without reloading. */
export function startRouter(): void {
  window.addEventListener("popstate", () => {
    if (location.pathname === renderedPath) return;
    current();
  });
  document.addEventListener("click", (ev) => {
    if (ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    const a = (ev.target as Element | null)?.closest?.("a");
    if (!a || a.target || a.hasAttribute("download")) return;
    const href = a.getAttribute("href");
    if (!href || !href.startsWith(`${BASE}/`) && href !== BASE) return;
    ev.preventDefault();
    navigate(href);
  });
  current();
}

/** A link inside the app. */
export function href(path: string): string {
  return BASE + path;
}
