/** Webhooks the test sends itself, signed like the dispatcher signs them. */
import { randomUUID } from 'node:crypto';

import { sign } from '../../src/signing';
import { WEBHOOK_SECRET } from './dispatcher';

export interface SentWebhook {
    status: number;
    body: any;
}

export function webhookBody(type: string, data: Record<string, unknown>): string {
    return JSON.stringify({ type, timestamp: new Date().toISOString(), data });
}

export function signedHeaders(body: string, id = `msg_${randomUUID()}`, timestamp = Math.floor(Date.now() / 1000), secret = WEBHOOK_SECRET): Record<string, string> {
    return {
        'content-type': 'application/json',
        'webhook-id': id,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': sign(secret, id, timestamp, body),
    };
}

export async function postWebhook(vendurePort: number, body: string, headers: Record<string, string>): Promise<SentWebhook> {
    const response = await fetch(`http://127.0.0.1:${vendurePort}/dispatcher/webhooks`, { method: 'POST', headers, body });
    const text = await response.text();
    let parsed: unknown = text;
    try {
        parsed = JSON.parse(text);
    } catch {
        // not JSON: keep the text
    }
    return { status: response.status, body: parsed };
}
