/** Applies the dispatcher's answers and webhooks to Vendure orders, each fact exactly once. */
import { Injectable } from '@nestjs/common';
import { HistoryEntryType } from '@vendure/common/lib/generated-types';
import {
    ChannelService,
    Fulfillment,
    HistoryService,
    ID,
    isGraphQlErrorResult,
    Logger,
    manualFulfillmentHandler,
    Order,
    OrderService,
    RequestContext,
    RequestContextService,
    TransactionalConnection,
} from '@vendure/core';
import { randomUUID } from 'node:crypto';
import { IsNull, LessThan } from 'typeorm';

import { DRIVER_ASSIGNED_STATE, LOGGER_CTX } from './constants';
import { DispatcherDeliveryState } from './delivery-state.entity';
import { DispatcherWebhookReceipt } from './webhook-receipt.entity';

/** What the dispatcher says about one seller order (an answer or the `data` of a webhook). */
export interface DeliveryFact {
    sellerOrderId: string;
    driverId?: string;
    assignmentId?: string;
    distanceKm?: number;
    sequence?: number;
    reason?: string;
    expiresAt?: string;
}

export type WebhookType =
    | 'delivery.assigned'
    | 'delivery.picked_up'
    | 'delivery.delivered'
    | 'delivery.failed'
    | 'delivery.cancelled'
    | 'delivery.unassigned';

export const WEBHOOK_TYPES: readonly WebhookType[] = [
    'delivery.assigned',
    'delivery.picked_up',
    'delivery.delivered',
    'delivery.failed',
    'delivery.cancelled',
    'delivery.unassigned',
];

export type Outcome = 'applied' | 'duplicate' | 'stale' | 'unknown-order';

const FULFILLMENT_METHOD = 'Dispatcher driver';

@Injectable()
export class DeliveryUpdater {
    /** Queue of this process's writes, used only on SQLite-family databases (see `serialize`). */
    private tail: Promise<unknown> = Promise.resolve();

    constructor(
        private readonly connection: TransactionalConnection,
        private readonly orderService: OrderService,
        private readonly historyService: HistoryService,
        private readonly channelService: ChannelService,
        private readonly requestContextService: RequestContextService,
    ) {}

    /** A context on the default channel, which holds every order, seller orders included. */
    async adminContext(): Promise<RequestContext> {
        const channel = await this.channelService.getDefaultChannel();
        return this.requestContextService.create({ apiType: 'admin', channelOrToken: channel });
    }

    /**
     * sql.js and SQLite have one connection, so two transactions at once would interleave on it:
     * there, this process's writes queue up. PostgreSQL and MySQL run them concurrently, and the
     * row guards (claimReceipt, claimSequence, claimAssignment) decide who applies a fact.
     */
    serialize<T>(work: () => Promise<T>): Promise<T> {
        const type = this.connection.rawConnection.options.type;
        if (type !== 'sqljs' && type !== 'sqlite' && type !== 'better-sqlite3') return work();
        const run = this.tail.then(work, work);
        this.tail = run.catch(() => undefined);
        return run;
    }

    /** Apply one verified webhook: once per webhook-id, and only if newer than what was applied. */
    applyWebhook(webhookId: string, type: WebhookType, fact: DeliveryFact): Promise<Outcome> {
        return this.serialize(async () => {
            const ctx = await this.adminContext();
            return this.connection.withTransaction(ctx, async tx => {
                if (!(await this.claimReceipt(tx, webhookId, type))) return 'duplicate';
                const order = await this.findOrder(tx, fact.sellerOrderId);
                if (!order) {
                    Logger.warn(`webhook ${webhookId} names unknown order ${fact.sellerOrderId}`, LOGGER_CTX);
                    return 'unknown-order';
                }
                await this.ensureState(tx, order);
                if (fact.sequence === undefined || !(await this.claimSequence(tx, order, fact.sequence))) {
                    // Not newer than what was applied: dropped, and answered 2xx so it is not resent.
                    return 'stale';
                }
                await this.apply(tx, order, type, fact, 'webhook');
                return 'applied';
            });
        });
    }

    /** Apply the synchronous answer to `seller-order-ready`. */
    applyAnswer(
        orderId: ID,
        kind: 'assigned' | 'awaiting' | 'no-driver',
        fact: DeliveryFact,
        retry?: { round: number; dueAt: Date },
    ): Promise<void> {
        return this.serialize(async () => {
            const ctx = await this.adminContext();
            await this.connection.withTransaction(ctx, async tx => {
                const order = await this.connection.getRepository(tx, Order).findOne({ where: { id: orderId } });
                if (!order) return;
                await this.ensureState(tx, order);
                if (kind === 'assigned') {
                    await this.apply(tx, order, 'delivery.assigned', fact, 'answer');
                } else if (!(await this.claimUnassigned(tx, order))) {
                    // A driver accepted (and its webhook was applied) before this answer got here.
                    return;
                } else if (kind === 'awaiting') {
                    await this.setFields(tx, order.id, { dispatcherDeliveryStatus: 'AWAITING_ACCEPTANCE' });
                    await this.note(tx, order.id, `Offered to drivers; waiting for one to accept${fact.expiresAt ? ` (offer expires ${fact.expiresAt})` : ''}.`);
                } else {
                    await this.setFields(tx, order.id, { dispatcherDeliveryStatus: 'NO_DRIVER' });
                    const next = retry ? ` Dispatch round ${retry.round} is due at ${retry.dueAt.toISOString()}.` : '';
                    await this.note(tx, order.id, `No driver available (${fact.reason ?? 'no reason given'}).${next}`);
                    if (retry) {
                        // In the same transaction as the answer: a restart after it cannot lose the retry.
                        // Step 1 of the retry's life (see NoDriverRetries): due at dueAt, taken by nobody yet.
                        await this.connection
                            .getRepository(tx, DispatcherDeliveryState)
                            .update({ sellerOrderId: order.code }, { retryRound: retry.round, retryAt: retry.dueAt, retryJob: null });
                    }
                }
            });
        });
    }

    /** Record a note on an order in its own transaction (used by the dispatch job). */
    noteOnly(orderId: ID, text: string, fields?: Partial<Order['customFields']>): Promise<void> {
        return this.serialize(async () => {
            const ctx = await this.adminContext();
            await this.connection.withTransaction(ctx, async tx => {
                if (fields) await this.setFields(tx, orderId, fields);
                await this.note(tx, orderId, text);
            });
        });
    }

    private async apply(
        ctx: RequestContext,
        order: Order,
        type: WebhookType,
        fact: DeliveryFact,
        source: 'answer' | 'webhook',
    ): Promise<void> {
        switch (type) {
            case 'delivery.assigned': {
                if (!fact.assignmentId || !(await this.claimAssignment(ctx, order, fact.assignmentId))) {
                    return; // the answer and the webhook report one booking: whoever came second stops here
                }
                await this.setFields(ctx, order.id, {
                    dispatcherDriverId: fact.driverId ?? null,
                    dispatcherAssignmentId: fact.assignmentId,
                    dispatcherDistanceKm: fact.distanceKm ?? null,
                    dispatcherDeliveryStatus: 'ASSIGNED',
                });
                await this.note(
                    ctx,
                    order.id,
                    `Driver ${fact.driverId} assigned (${fact.assignmentId}, ${fact.distanceKm ?? '?'} km to pickup; from the ${source === 'answer' ? 'dispatcher’s answer' : 'delivery.assigned webhook'}).`,
                );
                const current = await this.orderState(ctx, order.id);
                if (current !== 'Cancelled' && current !== DRIVER_ASSIGNED_STATE) {
                    await this.transition(ctx, order.id, DRIVER_ASSIGNED_STATE);
                }
                return;
            }
            case 'delivery.picked_up': {
                await this.fillDriver(ctx, order, fact, 'PICKED_UP');
                await this.note(ctx, order.id, `Driver ${fact.driverId ?? ''} picked the order up.`);
                await this.shipWithDriver(ctx, order, fact, 'Shipped');
                return;
            }
            case 'delivery.delivered': {
                await this.fillDriver(ctx, order, fact, 'DELIVERED');
                await this.note(ctx, order.id, `Driver ${fact.driverId ?? ''} delivered the order.`);
                await this.shipWithDriver(ctx, order, fact, 'Delivered');
                return;
            }
            case 'delivery.failed':
                await this.fillDriver(ctx, order, fact, 'FAILED');
                await this.note(ctx, order.id, `Delivery failed: ${fact.reason ?? 'no reason given'}. The order needs attention.`);
                return;
            case 'delivery.cancelled':
                // Vendure is the source of truth for orders: the delivery is cancelled, the order is not.
                await this.fillDriver(ctx, order, fact, 'CANCELLED');
                await this.note(ctx, order.id, `Delivery cancelled${fact.reason ? `: ${fact.reason}` : ''}; the driver is free.`);
                return;
            case 'delivery.unassigned':
                await this.connection
                    .getRepository(ctx, DispatcherDeliveryState)
                    .update({ sellerOrderId: order.code }, { assignmentId: null });
                await this.setFields(ctx, order.id, {
                    dispatcherDeliveryStatus: 'UNASSIGNED',
                    dispatcherDriverId: null,
                    dispatcherAssignmentId: null,
                });
                await this.note(ctx, order.id, `No driver accepted (${fact.reason ?? 'no reason given'}); the order waits for the admin.`);
                return;
        }
    }

    /** Later facts name the driver too; fill the fields even if `assigned` has not arrived yet. */
    private async fillDriver(ctx: RequestContext, order: Order, fact: DeliveryFact, status: string): Promise<void> {
        const fields: Partial<Order['customFields']> = { dispatcherDeliveryStatus: status };
        if (fact.driverId) fields.dispatcherDriverId = fact.driverId;
        if (fact.assignmentId) fields.dispatcherAssignmentId = fact.assignmentId;
        await this.setFields(ctx, order.id, fields);
    }

    /** Shipped and Delivered need a fulfillment: the driver's, created at pickup (or now, if pickup was missed). */
    private async shipWithDriver(
        ctx: RequestContext,
        order: Order,
        fact: DeliveryFact,
        target: 'Shipped' | 'Delivered',
    ): Promise<void> {
        const full = await this.connection.getRepository(ctx, Order).findOne({
            where: { id: order.id },
            relations: { lines: true, fulfillments: true },
        });
        if (!full || full.state === 'Cancelled') return;
        let fulfillment: Fulfillment | undefined = (full.fulfillments ?? []).find(
            f => f.method === FULFILLMENT_METHOD && f.state !== 'Cancelled',
        );
        if (!fulfillment) {
            const created = await this.orderService.createFulfillment(ctx, {
                lines: full.lines.map(l => ({ orderLineId: l.id, quantity: l.quantity })),
                handler: {
                    code: manualFulfillmentHandler.code,
                    arguments: [
                        { name: 'method', value: FULFILLMENT_METHOD },
                        { name: 'trackingCode', value: fact.assignmentId ?? fact.driverId ?? '' },
                    ],
                },
            });
            if (isGraphQlErrorResult(created)) {
                await this.note(ctx, order.id, `Could not record the driver's fulfillment: ${created.message}`);
                return;
            }
            fulfillment = created;
        }
        const steps: string[] = target === 'Shipped' ? ['Shipped'] : ['Shipped', 'Delivered'];
        for (const step of steps) {
            if (fulfillment.state === step || (step === 'Shipped' && fulfillment.state === 'Delivered')) continue;
            const moved = await this.orderService.transitionFulfillmentToState(ctx, fulfillment.id, step as 'Shipped');
            if (isGraphQlErrorResult(moved)) {
                await this.note(ctx, order.id, `Could not move the driver's fulfillment to ${step}: ${moved.message}`);
                return;
            }
            fulfillment = moved;
        }
    }

    private async transition(ctx: RequestContext, orderId: ID, state: string): Promise<void> {
        const result = await this.orderService.transitionToState(ctx, orderId, state as 'DriverAssigned');
        if (isGraphQlErrorResult(result)) {
            await this.note(ctx, orderId, `Order not moved to ${state}: ${result.transitionError ?? result.message}`);
        }
    }

    private async orderState(ctx: RequestContext, orderId: ID): Promise<string | undefined> {
        const row = await this.connection.getRepository(ctx, Order).findOne({ where: { id: orderId }, select: { id: true, state: true } });
        return row?.state;
    }

    private async findOrder(ctx: RequestContext, code: string): Promise<Order | null> {
        return this.connection.getRepository(ctx, Order).findOne({ where: { code } });
    }

    private async setFields(ctx: RequestContext, orderId: ID, fields: Partial<Order['customFields']>): Promise<void> {
        // A nested object: TypeORM maps it onto the embedded custom-field columns.
        await this.connection.getRepository(ctx, Order).update({ id: orderId }, { customFields: fields });
    }

    private async note(ctx: RequestContext, orderId: ID, note: string): Promise<void> {
        await this.historyService.createHistoryEntryForOrder({ ctx, orderId, type: HistoryEntryType.ORDER_NOTE, data: { note } }, false);
    }

    private async ensureState(ctx: RequestContext, order: Order): Promise<void> {
        await this.connection
            .getRepository(ctx, DispatcherDeliveryState)
            .createQueryBuilder()
            .insert()
            .values({ sellerOrderId: order.code, orderId: String(order.id), sequence: 0, assignmentId: null, claim: '' })
            .orIgnore()
            .execute();
    }

    /**
     * Conditional updates tell the winner by a token: on PostgreSQL a concurrent writer waits on the
     * row lock and then re-checks the condition, so exactly one transaction's token survives.
     */
    private async claimSequence(ctx: RequestContext, order: Order, sequence: number): Promise<boolean> {
        const claim = randomUUID();
        const repo = this.connection.getRepository(ctx, DispatcherDeliveryState);
        await repo.update({ sellerOrderId: order.code, sequence: LessThan(sequence) }, { sequence, claim });
        return (await repo.findOne({ where: { sellerOrderId: order.code } }))?.claim === claim;
    }

    private async claimAssignment(ctx: RequestContext, order: Order, assignmentId: string): Promise<boolean> {
        const claim = randomUUID();
        const repo = this.connection.getRepository(ctx, DispatcherDeliveryState);
        await repo.update({ sellerOrderId: order.code, assignmentId: IsNull() }, { assignmentId, claim });
        return (await repo.findOne({ where: { sellerOrderId: order.code } }))?.claim === claim;
    }

    /** Locks the order's guard row and tells whether no booking has been applied yet. */
    private async claimUnassigned(ctx: RequestContext, order: Order): Promise<boolean> {
        const claim = randomUUID();
        const repo = this.connection.getRepository(ctx, DispatcherDeliveryState);
        await repo.update({ sellerOrderId: order.code, assignmentId: IsNull() }, { claim });
        return (await repo.findOne({ where: { sellerOrderId: order.code } }))?.claim === claim;
    }

    private async claimReceipt(ctx: RequestContext, webhookId: string, eventType: string): Promise<boolean> {
        const claim = randomUUID();
        const repo = this.connection.getRepository(ctx, DispatcherWebhookReceipt);
        await repo.createQueryBuilder().insert().values({ webhookId, claim, eventType }).orIgnore().execute();
        return (await repo.findOne({ where: { webhookId } }))?.claim === claim;
    }
}
