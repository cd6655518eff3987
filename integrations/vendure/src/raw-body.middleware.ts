/** Keeps the webhook route's exact request bytes: the signature covers them, not re-serialized JSON. */
import type { IncomingMessage, ServerResponse } from 'node:http';

export const MAX_WEBHOOK_BYTES = 256 * 1024;

export interface RawBodyRequest extends IncomingMessage {
    rawBody?: Buffer;
    body?: unknown;
    _body?: boolean;
}

export function rawBodyMiddleware(req: RawBodyRequest, res: ServerResponse, next: (err?: unknown) => void): void {
    const chunks: Buffer[] = [];
    let size = 0;
    let failed = false;
    req.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_WEBHOOK_BYTES && !failed) {
            failed = true;
            res.statusCode = 413;
            res.setHeader('content-type', 'application/problem+json');
            res.end(JSON.stringify({ type: 'about:blank', title: 'Payload Too Large', status: 413, detail: 'webhook body too large' }));
            req.destroy();
            return;
        }
        chunks.push(chunk);
    });
    req.on('end', () => {
        if (failed) return;
        req.rawBody = Buffer.concat(chunks);
        req.body = req.rawBody;
        // Tells the framework's JSON parser that the body was already read.
        req._body = true;
        next();
    });
    req.on('error', err => next(err));
}
