/** `POST /dispatcher/webhooks`: verified, de-duplicated `delivery.*` webhooks from the dispatcher. */
import { Controller, Inject, Post, Req, Res } from '@nestjs/common';
import { Logger } from '@vendure/core';
import type { ServerResponse } from 'node:http';

import { DISPATCHER_PLUGIN_OPTIONS, LOGGER_CTX, WEBHOOK_ROUTE } from './constants';
import { DeliveryFact, DeliveryUpdater, WEBHOOK_TYPES, WebhookType } from './delivery-updater.service';
import { ResolvedOptions } from './options';
import { RawBodyRequest } from './raw-body.middleware';
import { InvalidSignatureError, verify } from './signing';

function problem(res: ServerResponse, status: number, title: string, detail: string): void {
    res.statusCode = status;
    res.setHeader('content-type', 'application/problem+json');
    res.end(JSON.stringify({ type: 'about:blank', title, status, detail }));
}

/** The webhook body, checked field by field; undefined when it is not one we can apply. */
function parse(raw: Buffer): { type: WebhookType; fact: DeliveryFact } | string {
    let body: unknown;
    try {
        body = JSON.parse(raw.toString('utf8'));
    } catch {
        return 'body is not JSON';
    }
    const event = body as { type?: unknown; data?: Record<string, unknown> };
    if (typeof event.type !== 'string' || !WEBHOOK_TYPES.includes(event.type as WebhookType)) {
        return `unknown event type ${JSON.stringify(event.type)}`;
    }
    const data = event.data;
    if (!data || typeof data !== 'object') return 'data is missing';
    const id = data.sellerOrderId;
    if (typeof id !== 'string' || id.length === 0 || id.length > 128) return 'data.sellerOrderId is missing';
    if (!Number.isInteger(data.sequence) || (data.sequence as number) < 1) return 'data.sequence is missing';
    const text = (v: unknown) => (typeof v === 'string' ? v : undefined);
    return {
        type: event.type as WebhookType,
        fact: {
            sellerOrderId: id,
            sequence: data.sequence as number,
            driverId: text(data.driverId),
            assignmentId: text(data.assignmentId),
            distanceKm: typeof data.distanceKm === 'number' ? data.distanceKm : undefined,
            reason: text(data.reason),
        },
    };
}

@Controller(WEBHOOK_ROUTE)
export class DispatcherWebhookController {
    constructor(
        @Inject(DISPATCHER_PLUGIN_OPTIONS) private readonly options: ResolvedOptions,
        private readonly updater: DeliveryUpdater,
    ) {}

    @Post()
    async receive(@Req() req: RawBodyRequest, @Res() res: ServerResponse): Promise<void> {
        const raw = req.rawBody;
        if (!raw) {
            problem(res, 500, 'Misconfigured', 'the raw-body middleware did not run for this route');
            return;
        }
        let webhookId: string;
        try {
            webhookId = verify(this.options.webhookSecret, req.headers, raw, this.options.webhookToleranceS);
        } catch (e) {
            if (e instanceof InvalidSignatureError) {
                problem(res, 401, 'Unauthorized', e.message);
                return;
            }
            throw e;
        }
        const parsed = parse(raw);
        if (typeof parsed === 'string') {
            // Authentic but not applicable: 2xx would hide it, 4xx stops nothing useful either;
            // 422 lets the dispatcher's operators see it in its outbox.
            problem(res, 422, 'Unprocessable Content', parsed);
            return;
        }
        const outcome = await this.updater.applyWebhook(webhookId, parsed.type, parsed.fact);
        Logger.verbose(`${parsed.type} ${webhookId} for ${parsed.fact.sellerOrderId}: ${outcome}`, LOGGER_CTX);
        res.statusCode = 200;
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ outcome }));
    }
}
