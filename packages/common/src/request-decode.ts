import fs from 'node:fs';
import path from 'node:path';
import * as protoLoader from '@grpc/proto-loader';
import { invalidArgument, type SdmeshError } from './errors';
import { Reason } from './reasons';

/**
 * Decoding of request messages on the server, so that a request that cannot be decoded is the
 * caller's fault (INVALID_ARGUMENT, naming the field) and not an INTERNAL error.
 *
 * sdmesh's protobuf integers are 64-bit on the wire but JavaScript numbers in the code
 * (ts-proto `forceLong=number`), and a number holds integers exactly only up to 2^53 − 1.
 * The generated decoder throws on anything larger, and grpc-js answers a throwing
 * deserializer with `INTERNAL: Error deserializing request`. Here the deserializer never
 * throws: it returns an UndecodableRequest that the server turns into the caller's error after
 * authorization (an unauthorized caller learns nothing about its request). To name the field,
 * the request bytes are walked once more against the message descriptors of sdmesh's .proto
 * files (only on that error path).
 */
export class UndecodableRequest {
  // A private field: the audit log's walk over request fields does not see it.
  readonly #error: SdmeshError;

  constructor(error: SdmeshError) {
    this.#error = error;
  }

  get error(): SdmeshError {
    return this.#error;
  }
}

/** The largest magnitude a 64-bit protobuf integer may have in an sdmesh request. */
const LIMIT = BigInt(Number.MAX_SAFE_INTEGER);

/** Decodes a request, or describes why it can't be decoded (never throws). */
export function decodeRequest<T>(type: { decode(input: Uint8Array): T }, methodPath: string, bytes: Buffer): T | UndecodableRequest {
  try {
    return type.decode(bytes);
  } catch (err) {
    const method = methodPath.replace(/^\//, '');
    let found: { field: string; value: bigint } | undefined;
    try {
      found = findUnsafeInteger(methodPath, bytes);
    } catch {
      found = undefined; // malformed beyond the integers: the generic message below
    }
    if (found) {
      return new UndecodableRequest(
        invalidArgument(
          `${found.field} ${found.value} is out of range: 64-bit integers in sdmesh requests must lie within ±${LIMIT} (2^53 − 1)`,
          Reason.VALUE_OUT_OF_RANGE,
        ),
      );
    }
    return new UndecodableRequest(
      invalidArgument(`the ${method} request could not be decoded: ${err instanceof Error ? err.message : String(err)}`, Reason.MALFORMED_REQUEST),
    );
  }
}

interface FieldInfo {
  name: string;
  number: number;
  type: string;
  typeName: string;
  label: string;
}

interface MessageInfo {
  name: string;
  field: FieldInfo[];
}

type Definitions = Record<string, { type?: MessageInfo; format?: string } | Record<string, { path: string; requestType: { type: MessageInfo } }>>;

let definitions: Definitions | undefined;
let requestTypes: Map<string, MessageInfo> | undefined;

/** sdmesh's .proto files, loaded once on first need. */
function load(): { defs: Definitions; byPath: Map<string, MessageInfo> } {
  if (!definitions || !requestTypes) {
    const protoDir = path.resolve(__dirname, '../../../proto');
    const files = fs
      .readdirSync(path.join(protoDir, 'sdmesh', 'v1'))
      .filter((f) => f.endsWith('.proto'))
      .map((f) => `sdmesh/v1/${f}`);
    const defs = protoLoader.loadSync(files, { includeDirs: [protoDir], keepCase: true }) as unknown as Definitions;
    const byPath = new Map<string, MessageInfo>();
    for (const value of Object.values(defs)) {
      if ('format' in value || 'type' in value) continue;
      for (const m of Object.values(value as Record<string, { path: string; requestType: { type: MessageInfo } }>)) byPath.set(m.path, m.requestType.type);
    }
    definitions = defs;
    requestTypes = byPath;
  }
  return { defs: definitions, byPath: requestTypes };
}

/** A message type named relative to the scope of the message that refers to it. */
function resolveType(defs: Definitions, scope: string, typeName: string): MessageInfo | undefined {
  const name = typeName.replace(/^\./, '');
  const parts = scope.split('.');
  for (let i = parts.length; i >= 0; i--) {
    const candidate = [...parts.slice(0, i), name].filter(Boolean).join('.');
    const def = defs[candidate] as { type?: MessageInfo; format?: string } | undefined;
    if (def?.format && def.type) return def.type;
  }
  return undefined;
}

const SIXTY_FOUR_BIT = new Set(['TYPE_INT64', 'TYPE_UINT64', 'TYPE_SINT64', 'TYPE_FIXED64', 'TYPE_SFIXED64']);

/** The first 64-bit integer field of the request whose value a JavaScript number can't hold. */
export function findUnsafeInteger(methodPath: string, bytes: Uint8Array): { field: string; value: bigint } | undefined {
  const { defs, byPath } = load();
  const type = byPath.get(methodPath);
  if (!type) return undefined;
  return walk(defs, 'sdmesh.v1', type, bytes, '', 0);
}

function walk(
  defs: Definitions,
  scope: string,
  type: MessageInfo,
  buf: Uint8Array,
  prefix: string,
  depth: number,
): { field: string; value: bigint } | undefined {
  if (depth > 32) return undefined;
  const r = new WireReader(buf);
  const counts = new Map<number, number>();
  while (!r.done()) {
    const tag = r.varint();
    const number = Number(tag >> 3n);
    const wire = Number(tag & 7n);
    const field = type.field.find((f) => f.number === number);
    const index = counts.get(number) ?? 0;
    counts.set(number, index + 1);
    const name = field ? `${prefix}${field.name}${field.label === 'LABEL_REPEATED' ? `[${index}]` : ''}` : '';
    switch (wire) {
      case 0: {
        const raw = r.varint();
        if (field && SIXTY_FOUR_BIT.has(field.type)) {
          const v = toValue(field.type, raw);
          if (v > LIMIT || v < -LIMIT) return { field: name, value: v };
        }
        break;
      }
      case 1: {
        const raw = r.fixed64();
        if (field && SIXTY_FOUR_BIT.has(field.type)) {
          const v = toValue(field.type, raw);
          if (v > LIMIT || v < -LIMIT) return { field: name, value: v };
        }
        break;
      }
      case 2: {
        const chunk = r.bytes();
        if (field?.type === 'TYPE_MESSAGE') {
          const sub = resolveType(defs, scope, field.typeName);
          const found = sub && walk(defs, scope, sub, chunk, `${name}.`, depth + 1);
          if (found) return found;
        } else if (field && SIXTY_FOUR_BIT.has(field.type)) {
          // Packed repeated integers.
          const packed = new WireReader(chunk);
          for (let i = 0; !packed.done(); i++) {
            const v = toValue(field.type, field.type.includes('FIXED') ? packed.fixed64() : packed.varint());
            if (v > LIMIT || v < -LIMIT) return { field: `${prefix}${field.name}[${i}]`, value: v };
          }
        }
        break;
      }
      case 5:
        r.skip(4);
        break;
      default:
        throw new Error(`unsupported wire type ${wire}`);
    }
  }
  return undefined;
}

const TWO_64 = 1n << 64n;
const TWO_63 = 1n << 63n;

/** The integer a field of this type holds, from its raw 64 bits. */
function toValue(type: string, raw: bigint): bigint {
  const bits = raw & (TWO_64 - 1n);
  switch (type) {
    case 'TYPE_SINT64':
      return (bits >> 1n) ^ -(bits & 1n);
    case 'TYPE_INT64':
    case 'TYPE_SFIXED64':
      return bits >= TWO_63 ? bits - TWO_64 : bits;
    default:
      return bits;
  }
}

class WireReader {
  private pos = 0;
  constructor(private readonly buf: Uint8Array) {}

  done(): boolean {
    return this.pos >= this.buf.length;
  }

  varint(): bigint {
    let result = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      if (this.pos >= this.buf.length) throw new Error('truncated varint');
      const b = this.buf[this.pos++]!;
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) return result;
    }
    throw new Error('varint too long');
  }

  fixed64(): bigint {
    if (this.pos + 8 > this.buf.length) throw new Error('truncated fixed64');
    let v = 0n;
    for (let i = 7; i >= 0; i--) v = (v << 8n) | BigInt(this.buf[this.pos + i]!);
    this.pos += 8;
    return v;
  }

  bytes(): Uint8Array {
    const len = Number(this.varint());
    if (this.pos + len > this.buf.length) throw new Error('truncated length-delimited field');
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }

  skip(n: number): void {
    if (this.pos + n > this.buf.length) throw new Error('truncated field');
    this.pos += n;
  }
}
