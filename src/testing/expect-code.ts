/**
 * expectCode: the assertion tests use for "this must fail with VdiskError CODE" — it awaits the promise,
 * asserts a VdiskError with that code (and, if given, a message matching `pattern`), and returns it for
 * further checks.
 */
import assert from "node:assert/strict";
import { VdiskError } from "../errors";

export async function expectCode(
  promise: Promise<unknown>,
  code: string,
  pattern?: RegExp,
): Promise<VdiskError> {
  let caught: unknown = null;
  try {
    await promise;
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof VdiskError, `expected a VdiskError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  if (pattern) assert.match(caught.message, pattern);
  return caught;
}
