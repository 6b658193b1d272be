import assert from "node:assert/strict";

import { Code, ConnectError } from "../../src/index.js";

/** Asserts that `promise` rejects with a ConnectError of `code`; returns the error. */
export async function rejectsWithCode(promise: Promise<unknown>, code: Code): Promise<ConnectError> {
  let caught: unknown;
  try {
    await promise;
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof ConnectError, `expected a ConnectError with code ${Code[code]}, got ${String(caught)}`);
  assert.equal(caught.code, code, `expected ${Code[code]}, got ${Code[caught.code]}: ${caught.message}`);
  return caught;
}
