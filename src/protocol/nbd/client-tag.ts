/**
 * Client tags: a client may ask for the export `NAME/TAG` (e.g. `web/vm1`, `web@monday/backup`). It is
 * served exactly as `NAME`; the tag only names the client for the monitor, which accounts its requests
 * under NAME with that tag (docs/monitor.md). Export names therefore never contain '/' (disk and snapshot
 * names cannot), and NBD_OPT_LIST lists plain names.
 *
 * A tag is 1 to limits.clientTagBytesMax characters of [A-Za-z0-9._-]. The name is split at its first '/';
 * a name with a '/' and an invalid tag is refused like an unknown export, with a message saying why.
 */
import { clientTagBytesMax } from "../../limits";

const tagPattern = new RegExp(`^[A-Za-z0-9._-]{1,${clientTagBytesMax}}$`);

export type TaggedName =
  { ok: true; exportName: string; tag: string | null } | { ok: false; message: string };

/** Splits a requested export name into the export and the client tag (null without a '/'). */
export function splitClientTag(requested: string): TaggedName {
  const slash = requested.indexOf("/");
  if (slash < 0) return { ok: true, exportName: requested, tag: null };
  const tag = requested.slice(slash + 1);
  if (!tagPattern.test(tag)) {
    return {
      ok: false,
      message:
        `export name "${requested}": "${tag}" is not a valid client tag ` +
        `(NAME/TAG, TAG is 1 to ${clientTagBytesMax} of A-Z a-z 0-9 . _ -)`,
    };
  }
  return { ok: true, exportName: requested.slice(0, slash), tag };
}
