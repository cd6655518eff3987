/** Free loopback ports and polling with generous ceilings. */
import { createServer } from 'node:net';

export function freePort(): Promise<number> {
    return new Promise((resolve, reject) => {
        const server = createServer();
        server.unref();
        server.on('error', reject);
        server.listen(0, '127.0.0.1', () => {
            const address = server.address();
            const port = typeof address === 'object' && address ? address.port : 0;
            server.close(() => resolve(port));
        });
    });
}

/** Poll until `check` returns a value (not undefined); fail with `what` after `timeoutMs`. */
export async function waitFor<T>(what: string, check: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    let last: unknown;
    for (;;) {
        try {
            const value = await check();
            if (value !== undefined) return value;
        } catch (e) {
            last = e;
        }
        if (Date.now() > deadline) {
            throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
        }
        await new Promise(resolve => setTimeout(resolve, 200));
    }
}

export const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));
