/**
 * The pending "no driver" retry of each seller order, kept in the database so a restart of Vendure
 * (or a second instance) picks it up. Three steps, each a conditional update on the order's row:
 *
 * 1. Scheduled by DeliveryUpdater.applyAnswer, in the transaction that applies `assigned: false`:
 *    due at now + delay.
 * 2. `take` (a poller, any instance): the winner moves the due time forward by a lease and writes a
 *    fresh webhook-id into the row, then queues a job with that id. Losers see a future due time.
 *    Taking before queuing means two pollers queue one job; a crash between the two only delays the
 *    retry until the lease runs out, when it is due again and taken again under a new id.
 * 3. `consume` (the job, when it runs): clears the due time, but only for the job whose id the row
 *    holds, so a job queued before the lease ran out (and then superseded) does nothing, while a
 *    job-level retry of the current job (same id) runs again.
 */
import { Injectable } from '@nestjs/common';
import { ID, TransactionalConnection } from '@vendure/core';
import { IsNull, LessThanOrEqual, Not } from 'typeorm';

import { DispatcherDeliveryState } from './delivery-state.entity';
import { DeliveryUpdater } from './delivery-updater.service';
import { newWebhookId } from './signing';

/** How long a taken retry may wait for its job to start before another poller takes it again. */
export const RETRY_LEASE_MS = 120_000;

export interface TakenRetry {
    orderId: ID;
    sellerOrderId: string;
    round: number;
    webhookId: string;
}

@Injectable()
export class NoDriverRetries {
    constructor(
        private readonly connection: TransactionalConnection,
        private readonly updater: DeliveryUpdater,
    ) {}

    /** The codes of orders whose retry is due. */
    async due(now: Date): Promise<string[]> {
        const rows = await this.connection.rawConnection.getRepository(DispatcherDeliveryState).find({
            where: { retryAt: LessThanOrEqual(now) },
            select: { id: true, sellerOrderId: true },
            order: { retryAt: 'ASC' },
            take: 100,
        });
        return rows.map(r => r.sellerOrderId);
    }

    /** Step 2: take the due retry of one order; undefined if another poller (or nobody) holds it. */
    take(sellerOrderId: string, now: Date, leaseMs = RETRY_LEASE_MS): Promise<TakenRetry | undefined> {
        return this.updater.serialize(async () => {
            const ctx = await this.updater.adminContext();
            return this.connection.withTransaction(ctx, async tx => {
                const webhookId = newWebhookId();
                const repo = this.connection.getRepository(tx, DispatcherDeliveryState);
                await repo.update(
                    { sellerOrderId, retryAt: LessThanOrEqual(now) },
                    { retryAt: new Date(now.getTime() + leaseMs), retryJob: webhookId },
                );
                const row = await repo.findOne({ where: { sellerOrderId } });
                if (!row || row.retryJob !== webhookId) return undefined;
                return { orderId: row.orderId, sellerOrderId, round: row.retryRound, webhookId };
            });
        });
    }

    /** Step 3: true when this job holds the retry of `round`; the retry is then no longer pending. */
    consume(sellerOrderId: string, round: number, webhookId: string): Promise<boolean> {
        return this.updater.serialize(async () => {
            const ctx = await this.updater.adminContext();
            return this.connection.withTransaction(ctx, async tx => {
                const repo = this.connection.getRepository(tx, DispatcherDeliveryState);
                await repo.update({ sellerOrderId, retryRound: round, retryJob: webhookId }, { retryAt: null });
                const row = await repo.findOne({ where: { sellerOrderId } });
                return row?.retryJob === webhookId && row.retryRound === round;
            });
        });
    }

    /** A new dispatch (the order readied again) drops whatever retry the last one left pending. */
    async cancel(sellerOrderId: string): Promise<void> {
        await this.updater.serialize(async () => {
            await this.connection.rawConnection
                .getRepository(DispatcherDeliveryState)
                .update({ sellerOrderId, retryAt: Not(IsNull()) }, { retryAt: null, retryJob: null, retryRound: 0 });
        });
    }
}
