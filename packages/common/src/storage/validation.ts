import path from 'node:path';
import { invalidArgument } from '../errors';
import { TiB } from './layout';
import { Reason } from '../reasons';

/** Ids are lowercase RFC 4122-shaped UUIDs: they become file names and sanlock resource names. */
export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export const MAX_DESCRIPTION_BYTES = 256;
export const MAX_DOMAIN_NAME_BYTES = 128;
/** Capacities are whole 512-byte sectors: qemu's unit, and what imported disks have. */
export const CAPACITY_ALIGNMENT = 512;
export const MAX_CAPACITY_BYTES = 64 * TiB;

// C0 controls, DEL and C1 controls. They would break the key=value records (newline) or
// confuse terminals and logs.
// eslint-disable-next-line no-control-regex
const CONTROL_CHARS = /[\u0000-\u001f\u007f-\u009f]/;

export function isUuid(value: string): boolean {
  return UUID_RE.test(value);
}

/** Throws INVALID_ARGUMENT (reason INVALID_ID) unless value is a lowercase UUID. */
export function validateId(what: string, value: string): string {
  if (typeof value !== 'string' || !UUID_RE.test(value)) {
    throw invalidArgument(`${what} ${JSON.stringify(value)} is not a lowercase UUID`, Reason.INVALID_ID);
  }
  return value;
}

/** Free text stored in a record: bounded, one line, no control characters. */
export function validateText(what: string, value: string, maxBytes: number, allowEmpty = true): string {
  if (typeof value !== 'string') throw invalidArgument(`${what} must be a string`, Reason.INVALID_TEXT);
  if (!allowEmpty && value.length === 0) throw invalidArgument(`${what} must not be empty`, Reason.INVALID_TEXT);
  const bytes = Buffer.byteLength(value, 'utf8');
  if (bytes > maxBytes) throw invalidArgument(`${what} is ${bytes} bytes of UTF-8; at most ${maxBytes} allowed`, Reason.TEXT_TOO_LONG);
  if (CONTROL_CHARS.test(value)) throw invalidArgument(`${what} contains control characters`, Reason.INVALID_TEXT);
  // Lone surrogates would not survive a UTF-8 round trip.
  if (Buffer.from(value, 'utf8').toString('utf8') !== value) throw invalidArgument(`${what} is not valid Unicode`, Reason.INVALID_TEXT);
  return value;
}

export const validateDescription = (value: string): string => validateText('description', value, MAX_DESCRIPTION_BYTES);
export const validateDomainName = (value: string): string => validateText('domain name', value, MAX_DOMAIN_NAME_BYTES, false);

/** A size in bytes rounded up to whole 512-byte sectors. */
export const roundUpToSector = (bytes: number): number => Math.ceil(bytes / CAPACITY_ALIGNMENT) * CAPACITY_ALIGNMENT;

/** A guest-visible size: > 0, a multiple of 512, at most 64 TiB. */
export function validateCapacity(bytes: number): number {
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw invalidArgument(`capacity ${bytes} must be a positive whole number of bytes`, Reason.INVALID_CAPACITY);
  }
  if (bytes % CAPACITY_ALIGNMENT !== 0) {
    throw invalidArgument(`capacity ${bytes} is not a multiple of ${CAPACITY_ALIGNMENT} bytes`, Reason.INVALID_CAPACITY);
  }
  if (bytes > MAX_CAPACITY_BYTES) {
    throw invalidArgument(`capacity ${bytes} exceeds the maximum of 64 TiB (${MAX_CAPACITY_BYTES} bytes)`, Reason.INVALID_CAPACITY);
  }
  return bytes;
}

/** A domain path: absolute, no NUL, no ".." segments; returned normalized without a trailing slash. */
export function validateDomainPath(value: string): string {
  if (typeof value !== 'string' || value.length === 0) throw invalidArgument('domain path is empty', Reason.INVALID_PATH);
  if (value.includes('\0')) throw invalidArgument('domain path contains a NUL byte', Reason.INVALID_PATH);
  if (!path.isAbsolute(value)) throw invalidArgument(`domain path ${JSON.stringify(value)} is not absolute`, Reason.INVALID_PATH);
  if (value.split('/').includes('..')) {
    throw invalidArgument(`domain path ${JSON.stringify(value)} contains ".."`, Reason.INVALID_PATH);
  }
  const resolved = path.resolve(value);
  if (resolved === '/') throw invalidArgument('the root directory cannot be a storage domain', Reason.INVALID_PATH);
  return resolved;
}

/**
 * Joins names under root and proves the result stays inside it. Every name must be one path
 * component: not empty, not "." or "..", no "/" and no NUL.
 */
export function safeJoin(root: string, ...names: string[]): string {
  for (const name of names) {
    if (typeof name !== 'string' || name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
      throw invalidArgument(`name ${JSON.stringify(name)} is not a single path component`, Reason.INVALID_PATH);
    }
  }
  const base = path.resolve(root);
  const joined = path.resolve(base, ...names);
  if (!joined.startsWith(base + path.sep)) {
    throw invalidArgument(`path ${JSON.stringify(joined)} is outside the domain ${JSON.stringify(base)}`, Reason.INVALID_PATH);
  }
  return joined;
}
