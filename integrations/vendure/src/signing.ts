/** Standard Webhooks signatures: sign what Vendure sends, verify what the dispatcher sends. */
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';

export function decodeSecret(secret: string): Buffer {
    const key = Buffer.from(secret.startsWith('whsec_') ? secret.slice('whsec_'.length) : secret, 'base64');
    if (key.length === 0) throw new Error('empty webhook secret');
    return key;
}

export function sign(secret: string, id: string, timestamp: number | string, body: Buffer | string): string {
    const mac = createHmac('sha256', decodeSecret(secret));
    mac.update(`${id}.${timestamp}.`);
    mac.update(body);
    return `v1,${mac.digest('base64')}`;
}

export function newWebhookId(): string {
    return `msg_${randomUUID().replace(/-/g, '')}`;
}

/** Headers for one attempt; the timestamp is fresh on every attempt, the id is the caller's. */
export function signedHeaders(secret: string, id: string, body: string): Record<string, string> {
    const timestamp = Math.floor(Date.now() / 1000);
    return {
        'content-type': 'application/json',
        'webhook-id': id,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': sign(secret, id, timestamp, body),
    };
}

export class InvalidSignatureError extends Error {}

/** Check the headers against the raw body; returns the webhook-id. */
export function verify(
    secret: string,
    headers: Record<string, string | string[] | undefined>,
    body: Buffer,
    toleranceS: number,
    nowS: number = Date.now() / 1000,
): string {
    const header = (name: string): string => {
        const value = headers[name];
        const text = Array.isArray(value) ? value[0] : value;
        if (!text) throw new InvalidSignatureError(`missing ${name}`);
        return text;
    };
    const id = header('webhook-id');
    const rawTimestamp = header('webhook-timestamp');
    const signatures = header('webhook-signature');
    if (!/^\d{1,12}$/.test(rawTimestamp)) throw new InvalidSignatureError('webhook-timestamp is not Unix seconds');
    if (Math.abs(nowS - Number(rawTimestamp)) > toleranceS) {
        throw new InvalidSignatureError('webhook-timestamp is outside the tolerance');
    }
    const expected = Buffer.from(sign(secret, id, rawTimestamp, body).slice(3), 'base64');
    for (const entry of signatures.split(' ')) {
        const [version, value] = entry.split(',', 2);
        if (version !== 'v1' || !value) continue;
        const candidate = Buffer.from(value, 'base64');
        if (candidate.length === expected.length && timingSafeEqual(candidate, expected)) return id;
    }
    throw new InvalidSignatureError('no matching signature');
}
