/** Signed events to the dispatcher, retried with backoff under one webhook-id. */
import { Logger } from '@vendure/core';

import { LOGGER_CTX } from './constants';
import { ResolvedOptions } from './options';
import { signedHeaders } from './signing';

export interface ReadyEvent {
    eventId: string;
    sellerOrderId: string;
    channelId: string;
    pickup: { lat: number; lon: number };
    drop: { lat: number; lon: number };
}

export type ReadyAnswer =
    | { assigned: true; sellerOrderId: string; driverId: string; assignmentId: string; distanceKm: number; zoneId?: string }
    | { assigned: false; sellerOrderId: string; reason: string; dispatchStatus?: string; expiresAt?: string };

export interface Sent<T> {
    status: number;
    body: T;
    attempts: number;
}

/** The dispatcher refused the event (4xx other than 408/429): retrying the same bytes cannot help. */
export class RejectedError extends Error {
    constructor(readonly status: number, readonly detail: string) {
        super(`dispatcher answered ${status}: ${detail}`);
    }
}

/** Every attempt failed with a network error or a retryable status. */
export class UnreachableError extends Error {
    constructor(readonly attempts: number, readonly lastError: string) {
        super(`dispatcher unreachable after ${attempts} attempts: ${lastError}`);
    }
}

const RETRYABLE = new Set([408, 425, 429, 500, 502, 503, 504]);

export class DispatcherClient {
    constructor(private readonly options: ResolvedOptions) {}

    ready(webhookId: string, event: ReadyEvent): Promise<Sent<ReadyAnswer>> {
        return this.send('/events/seller-order-ready', webhookId, event, []);
    }

    /** A 404 (never booked) counts as done: there is nothing to cancel. */
    cancelled(webhookId: string, sellerOrderId: string, reason: string): Promise<Sent<unknown>> {
        return this.send('/events/seller-order-cancelled', webhookId, { sellerOrderId, reason }, [404]);
    }

    private async send<T>(path: string, webhookId: string, payload: unknown, alsoOk: number[]): Promise<Sent<T>> {
        const { attempts, initialDelayMs, maxDelayMs } = this.options.retry;
        const body = JSON.stringify(payload);
        let lastError = '';
        for (let attempt = 1; attempt <= attempts; attempt++) {
            let retryAfterMs: number | undefined;
            try {
                const response = await fetch(this.options.dispatcherUrl + path, {
                    method: 'POST',
                    // Same id on every attempt; fresh timestamp so the signature stays within tolerance.
                    headers: signedHeaders(this.options.outboundSecret, webhookId, body),
                    body,
                    signal: AbortSignal.timeout(this.options.requestTimeoutMs),
                });
                const text = await response.text();
                if (response.ok || alsoOk.includes(response.status)) {
                    return { status: response.status, body: (text ? JSON.parse(text) : {}) as T, attempts: attempt };
                }
                if (!RETRYABLE.has(response.status)) throw new RejectedError(response.status, text.slice(0, 500));
                lastError = `HTTP ${response.status}`;
                const header = Number(response.headers.get('retry-after'));
                if (Number.isFinite(header) && header > 0) retryAfterMs = header * 1000;
            } catch (e) {
                if (e instanceof RejectedError) throw e;
                lastError = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
            }
            if (attempt === attempts) break;
            const backoff = Math.min(maxDelayMs, initialDelayMs * 2 ** (attempt - 1));
            const delay = Math.max(retryAfterMs ?? 0, backoff * (0.8 + Math.random() * 0.4));
            Logger.warn(`${path} ${webhookId} attempt ${attempt} failed (${lastError}); retrying in ${Math.round(delay)} ms`, LOGGER_CTX);
            await new Promise(resolve => setTimeout(resolve, delay));
        }
        throw new UnreachableError(attempts, lastError);
    }
}
