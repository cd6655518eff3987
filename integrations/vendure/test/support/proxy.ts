/** A recording HTTP proxy in front of the dispatcher: it can drop or refuse the next requests. */
import { createServer, IncomingHttpHeaders, Server } from 'node:http';

export interface Recorded {
    path: string;
    headers: IncomingHttpHeaders;
    body: string;
    outcome: 'forwarded' | 'dropped' | 'refused' | 'canned';
    status?: number;
    /** The dispatcher's answer, as forwarded. */
    response?: string;
}

export class RecordingProxy {
    target = '';
    readonly requests: Recorded[] = [];
    /** What to do with the next requests, in order; when empty, forward. */
    readonly plan: Array<'drop' | '503' | { status: number; body: unknown }> = [];
    private server?: Server;
    port = 0;

    async start(): Promise<string> {
        this.server = createServer((req, res) => {
            const chunks: Buffer[] = [];
            req.on('data', (c: Buffer) => chunks.push(c));
            req.on('end', () => {
                const body = Buffer.concat(chunks);
                const record: Recorded = { path: req.url ?? '', headers: req.headers, body: body.toString(), outcome: 'forwarded' };
                this.requests.push(record);
                const next = this.plan.shift();
                if (next === 'drop') {
                    record.outcome = 'dropped';
                    req.socket.destroy(); // the client sees a network error
                    return;
                }
                if (next === '503') {
                    record.outcome = 'refused';
                    record.status = 503;
                    res.writeHead(503, { 'content-type': 'application/problem+json', 'retry-after': '1' });
                    res.end(JSON.stringify({ type: 'about:blank', title: 'Service Unavailable', status: 503, detail: 'test proxy' }));
                    return;
                }
                if (typeof next === 'object') {
                    // A canned answer in place of the dispatcher's (for answers it cannot give yet).
                    record.outcome = 'canned';
                    record.status = next.status;
                    record.response = JSON.stringify(next.body);
                    res.writeHead(next.status, { 'content-type': 'application/json' });
                    res.end(record.response);
                    return;
                }
                const headers: Record<string, string> = {};
                for (const [k, v] of Object.entries(req.headers)) {
                    if (typeof v === 'string' && k !== 'host' && k !== 'content-length' && k !== 'connection') headers[k] = v;
                }
                fetch(this.target + (req.url ?? ''), { method: req.method, headers, body: body.length ? body : undefined })
                    .then(async upstream => {
                        record.status = upstream.status;
                        const out = Buffer.from(await upstream.arrayBuffer());
                        record.response = out.toString();
                        const copy: Record<string, string> = {};
                        upstream.headers.forEach((v, k) => {
                            if (k !== 'content-length' && k !== 'transfer-encoding' && k !== 'content-encoding') copy[k] = v;
                        });
                        res.writeHead(upstream.status, copy);
                        res.end(out);
                    })
                    .catch(() => req.socket.destroy());
            });
        });
        await new Promise<void>(resolve => this.server!.listen(0, '127.0.0.1', resolve));
        const address = this.server.address();
        this.port = typeof address === 'object' && address ? address.port : 0;
        return `http://127.0.0.1:${this.port}`;
    }

    async stop(): Promise<void> {
        this.server?.closeAllConnections();
        await new Promise(resolve => this.server?.close(resolve));
    }
}
