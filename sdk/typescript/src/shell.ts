/**
 * Shell quoting for the commands the SDK builds itself (the code interpreter's and the
 * desktop's): every argument that comes from a caller is quoted.
 *
 * @module
 */

/**
 * `s` as one word of a POSIX shell line, as Python's `shlex.quote` writes it: unchanged
 * when it is only safe characters, else in single quotes (a `'` inside as `'"'"'`).
 *
 * @internal
 */
export function shellQuote(s: string): string {
  if (s === "") return "''";
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return `'${s.replace(/'/g, `'"'"'`)}'`;
}
