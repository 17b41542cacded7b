/**
 * HTTP byte ranges of the data endpoint: `Range: bytes=a-b` (GET) and `Content-Range: bytes a-b/total`
 * (PUT), checked against the disk's size. Only one range per request (no multipart answers).
 */

/** A half-open byte range [start, end). */
export interface ByteRange {
  start: number;
  end: number;
}

/** An HTTP answer to a request the endpoint refuses: status and a message a person understands. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'HttpError';
  }
}

const outside = (size: number, what: string) =>
  new HttpError(416, `${what} is outside the disk (0-${size - 1}, ${size} bytes)`, { 'Content-Range': `bytes */${size}` });

const toInt = (s: string): number => {
  const n = Number(s);
  return Number.isSafeInteger(n) ? n : NaN;
};

/**
 * The range of a GET: the whole disk without a Range header; `bytes=a-b` (inclusive b), `bytes=a-`,
 * `bytes=-n` (the last n bytes). A range reaching past the end or starting outside is refused (416)
 * rather than clipped: a client asking for bytes the disk does not have has the wrong disk or size.
 */
export function parseRange(header: string | undefined, size: number): ByteRange {
  if (header === undefined || header === '') return { start: 0, end: size };
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) throw new HttpError(400, `unsupported Range header "${header}": give one range, bytes=start-end`);
  if (m[1] === '') {
    const n = toInt(m[2]!);
    if (!(n > 0) || n > size) throw outside(size, `range "${header}"`);
    return { start: size - n, end: size };
  }
  const start = toInt(m[1]!);
  if (start >= size) throw outside(size, `range "${header}"`);
  const last = m[2] === '' ? size - 1 : toInt(m[2]!);
  if (Number.isNaN(start) || Number.isNaN(last) || last < start) throw new HttpError(400, `invalid Range header "${header}": start after end`);
  if (last >= size) throw outside(size, `range "${header}"`);
  return { start, end: last + 1 };
}

/**
 * The range of a PUT: `Content-Range: bytes a-b/total` (total may be `*`), or without the header the
 * body written from offset 0. The length must equal the Content-Length, so the range is known before
 * any byte is written.
 */
export function parseContentRange(header: string | undefined, contentLength: number, size: number): ByteRange {
  if (header === undefined || header === '') {
    if (contentLength > size) throw outside(size, `a body of ${contentLength} bytes`);
    return { start: 0, end: contentLength };
  }
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header.trim());
  if (!m) throw new HttpError(400, `invalid Content-Range header "${header}": expected bytes start-end/total`);
  const start = toInt(m[1]!);
  const last = toInt(m[2]!);
  if (Number.isNaN(start) || Number.isNaN(last) || last < start) throw new HttpError(400, `invalid Content-Range header "${header}": start after end`);
  if (last + 1 - start !== contentLength) {
    throw new HttpError(400, `Content-Range "${header}" covers ${last + 1 - start} bytes but the body has ${contentLength} (Content-Length)`);
  }
  if (last >= size) throw outside(size, `Content-Range "${header}"`);
  return { start, end: last + 1 };
}

/** A range given as offset and size (PATCH zero, extents queries): inside [0, size). */
export function checkExtent(offset: unknown, length: unknown, size: number, what: string): ByteRange {
  if (typeof offset !== 'number' || typeof length !== 'number' || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new HttpError(400, `${what}: offset and size must be non-negative integers`);
  }
  if (offset + length > size) throw outside(size, `${what} ${offset}+${length}`);
  return { start: offset, end: offset + length };
}
