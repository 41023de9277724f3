// An in-page confirmation dialog (<dialog>.showModal(): focus-trapped, Esc cancels).
import { h } from "../dom";

export interface ConfirmOpts {
  title: string;
  message: string;
  confirmLabel?: string;
  danger?: boolean;
}

export function confirmDialog(opts: ConfirmOpts): Promise<boolean> {
  return new Promise((resolve) => {
    const cancel = h("button", { type: "button", class: "btn", "data-testid": "confirm-cancel", value: "cancel" }, "Cancel");
    const ok = h(
      "button",
      { type: "button", class: opts.danger ? "btn btn-danger" : "btn btn-primary", "data-testid": "confirm-ok", value: "ok" },
      opts.confirmLabel ?? "Confirm",
    );
    const titleId = `dlg-${Math.random().toString(36).slice(2)}`;
    const dlg = h(
      "dialog",
      { class: "dialog", "aria-labelledby": titleId, "aria-describedby": `${titleId}-msg`, "data-testid": "confirm-dialog" },
      h("h2", { id: titleId }, opts.title),
      h("p", { id: `${titleId}-msg` }, opts.message),
      h("div", { class: "dialog-actions" }, cancel, ok),
    );
    let done = false;
    const finish = (v: boolean) => {
      if (done) return;
      done = true;
      if (dlg.open) dlg.close();
      dlg.remove();
      resolve(v);
    };
    cancel.addEventListener("click", () => finish(false));
    ok.addEventListener("click", () => finish(true));
    dlg.addEventListener("close", () => finish(false));
    document.body.appendChild(dlg);
    dlg.showModal();
    cancel.focus();
  });
}
