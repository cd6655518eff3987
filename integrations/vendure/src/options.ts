/** Plugin options: where the dispatcher is, the two secrets, and when and how far to dispatch. */

export interface TransportRetryOptions {
    /** Attempts per event, the first included (network errors and 5xx are retried). */
    attempts: number;
    /** Delay before the second attempt; it doubles each time, up to `maxDelayMs`. */
    initialDelayMs: number;
    maxDelayMs: number;
}

export interface NoDriverRetryOptions {
    rounds: number;
    delayMs: number;
    pollMs?: number;
}

export interface DispatcherPluginOptions {
    /** Base URL of the dispatcher, e.g. `https://dispatcher.internal:8080`. */
    dispatcherUrl: string;
    /** `whsec_…` key Vendure signs its events with (the dispatcher's `DISPATCHER_INBOUND_SECRET`). */
    outboundSecret: string;
    /** `whsec_…` key that verifies the dispatcher's webhooks (its `DISPATCHER_VENDURE_WEBHOOK_SECRET`). */
    webhookSecret: string;
    /** Order state whose entry sends `seller-order-ready`. Default `ReadyForDispatch`. */
    dispatchState?: string;
    /** Largest distance in km between a seller's pickup and the customer's drop. Default 5. */
    radiusKm?: number;
    /** Retries of one event when the dispatcher cannot be reached or answers 5xx. */
    retry?: Partial<TransportRetryOptions>;
    /**
     * When no driver is free (`assigned: false`): how many more dispatch rounds to try, and how long
     * to wait between them. Default 0 rounds: the order stays ready and the admin decides. The next
     * round's due time is stored with the order, and every Vendure process polls for due rounds every
     * `pollMs` (default: the smaller of `delayMs` and 5 s), so a restart does not lose a round.
     */
    noDriverRetry?: NoDriverRetryOptions;
    /** Seconds a webhook's timestamp may differ from now. Default 300 (Standard Webhooks). */
    webhookToleranceS?: number;
    /** Per-request timeout towards the dispatcher. Default 10 000 ms. */
    requestTimeoutMs?: number;
}

export type ResolvedOptions = Required<Omit<DispatcherPluginOptions, 'retry' | 'noDriverRetry'>> & {
    retry: TransportRetryOptions;
    noDriverRetry: Required<NoDriverRetryOptions>;
};

export const DEFAULT_DISPATCH_STATE = 'ReadyForDispatch';

export function resolveOptions(options: DispatcherPluginOptions): ResolvedOptions {
    if (!options.dispatcherUrl) {
        throw new Error('DispatcherPlugin: dispatcherUrl is required');
    }
    for (const [name, value] of [
        ['outboundSecret', options.outboundSecret],
        ['webhookSecret', options.webhookSecret],
    ] as const) {
        if (!value || !value.startsWith('whsec_')) {
            throw new Error(`DispatcherPlugin: ${name} must be a whsec_… secret`);
        }
    }
    return {
        dispatcherUrl: options.dispatcherUrl.replace(/\/+$/, ''),
        outboundSecret: options.outboundSecret,
        webhookSecret: options.webhookSecret,
        dispatchState: options.dispatchState ?? DEFAULT_DISPATCH_STATE,
        radiusKm: options.radiusKm ?? 5,
        retry: {
            attempts: options.retry?.attempts ?? 8,
            initialDelayMs: options.retry?.initialDelayMs ?? 1000,
            maxDelayMs: options.retry?.maxDelayMs ?? 60_000,
        },
        noDriverRetry: resolveNoDriverRetry(options.noDriverRetry),
        webhookToleranceS: options.webhookToleranceS ?? 300,
        requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
    };
}

function resolveNoDriverRetry(given: NoDriverRetryOptions | undefined): Required<NoDriverRetryOptions> {
    const rounds = given?.rounds ?? 0;
    const delayMs = given?.delayMs ?? 30_000;
    if (!Number.isInteger(rounds) || rounds < 0) throw new Error('DispatcherPlugin: noDriverRetry.rounds must be a whole number ≥ 0');
    if (!(delayMs >= 0)) throw new Error('DispatcherPlugin: noDriverRetry.delayMs must be ≥ 0');
    const pollMs = given?.pollMs ?? Math.max(250, Math.min(delayMs, 5_000));
    if (!(pollMs > 0)) throw new Error('DispatcherPlugin: noDriverRetry.pollMs must be > 0');
    return { rounds, delayMs, pollMs };
}
