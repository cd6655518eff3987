/** Sends seller-order-ready / -cancelled through Vendure's job queue and applies the answers. */
import { Inject, Injectable, OnApplicationBootstrap, OnApplicationShutdown } from '@nestjs/common';
import { OrderType } from '@vendure/common/lib/generated-types';
import {
    EventBus,
    ID,
    Job,
    JobQueue,
    JobQueueService,
    Logger,
    Order,
    OrderStateTransitionEvent,
    TransactionalConnection,
} from '@vendure/core';

import { DISPATCH_QUEUE_NAME, DISPATCHER_PLUGIN_OPTIONS, LOGGER_CTX } from './constants';
import { DeliveryUpdater } from './delivery-updater.service';
import { DispatcherClient, RejectedError, UnreachableError } from './dispatcher-client';
import { routeOf } from './locations';
import { NoDriverRetries } from './no-driver-retries.service';
import { ResolvedOptions } from './options';
import { newWebhookId } from './signing';

/** One queued event. The webhook-id is fixed when the job is created, so every retry reuses it. */
export type DispatchJobData =
    | { kind: 'ready'; orderId: string; sellerOrderId: string; webhookId: string; round: number }
    | { kind: 'cancelled'; orderId: string; sellerOrderId: string; webhookId: string; reason: string };

@Injectable()
export class DispatchService implements OnApplicationBootstrap, OnApplicationShutdown {
    private queue!: JobQueue<DispatchJobData>;
    private poller?: NodeJS.Timeout;
    private readonly client: DispatcherClient;

    constructor(
        @Inject(DISPATCHER_PLUGIN_OPTIONS) private readonly options: ResolvedOptions,
        private readonly jobQueueService: JobQueueService,
        private readonly eventBus: EventBus,
        private readonly connection: TransactionalConnection,
        private readonly updater: DeliveryUpdater,
        private readonly retries: NoDriverRetries,
    ) {
        this.client = new DispatcherClient(options);
    }

    async onApplicationBootstrap(): Promise<void> {
        this.queue = await this.jobQueueService.createQueue<DispatchJobData>({
            name: DISPATCH_QUEUE_NAME,
            process: job => this.process(job),
        });
        this.eventBus.ofType(OrderStateTransitionEvent).subscribe(event => {
            this.onTransition(event).catch(e => Logger.error(`dispatch enqueue failed: ${String(e)}`, LOGGER_CTX));
        });
        if (this.options.noDriverRetry.rounds > 0) {
            this.poller = setInterval(() => void this.pollRetries(), this.options.noDriverRetry.pollMs);
            this.poller.unref();
        }
    }

    /** Stops this process's poller (on shutdown; tests use it to run pollers by hand). */
    onApplicationShutdown(): void {
        if (this.poller) clearInterval(this.poller);
        this.poller = undefined;
    }

    /**
     * Queue a job for every no-driver retry that is due (stored by the answer that found no driver).
     * Any number of pollers, in this process or others, may run at once (overlapping ticks too):
     * `take` lets one win each retry. Returns the orders this call queued a job for.
     */
    async pollRetries(now: Date = new Date()): Promise<string[]> {
        const queued: string[] = [];
        try {
            for (const sellerOrderId of await this.retries.due(now)) {
                const taken = await this.retries.take(sellerOrderId, now);
                if (!taken) continue;
                // Taken first, queued second: a crash in between leaves the retry due again once
                // the lease runs out, never lost; a job queued twice is stopped by `consume`.
                await this.queue.add(
                    { kind: 'ready', orderId: String(taken.orderId), sellerOrderId, webhookId: taken.webhookId, round: taken.round },
                    { retries: 1 },
                );
                queued.push(sellerOrderId);
            }
        } catch (e) {
            Logger.error(`no-driver retry poll failed: ${String(e)}`, LOGGER_CTX);
        }
        return queued;
    }

    private async onTransition(event: OrderStateTransitionEvent): Promise<void> {
        const { order, toState } = event;
        // Only seller orders (or unsplit orders) go to drivers, never the aggregate of a split.
        if (order.type === OrderType.Aggregate) return;
        if (toState === this.options.dispatchState) {
            await this.enqueueReady(order.id, order.code, 0);
        } else if (toState === 'Cancelled' && order.customFields?.dispatcherDeliveryStatus) {
            await this.queue.add(
                { kind: 'cancelled', orderId: String(order.id), sellerOrderId: order.code, webhookId: newWebhookId(), reason: 'cancelled in Vendure' },
                { retries: 1 },
            );
        }
    }

    /** A new dispatch round is a new event, so it gets a new webhook-id. */
    async enqueueReady(orderId: ID, sellerOrderId: string, round: number): Promise<Job<DispatchJobData>> {
        return this.queue.add(
            { kind: 'ready', orderId: String(orderId), sellerOrderId, webhookId: newWebhookId(), round },
            { retries: 1 },
        );
    }

    private async process(job: Job<DispatchJobData>): Promise<unknown> {
        const data = job.data;
        if (data.kind === 'cancelled') {
            const sent = await this.client.cancelled(data.webhookId, data.sellerOrderId, data.reason);
            if (sent.status !== 404) {
                await this.updater.noteOnly(data.orderId, 'The dispatcher cancelled the delivery and freed the driver.');
            }
            return { status: sent.status, attempts: sent.attempts };
        }
        const ctx = await this.updater.adminContext();
        const order = await this.connection.getRepository(ctx, Order).findOne({ where: { id: data.orderId } });
        // A retry round is consumed first, even for an order that has moved on: otherwise its
        // lease would run out and pollers would take it again, forever.
        if (data.round > 0 && !(await this.retries.consume(data.sellerOrderId, data.round, data.webhookId))) {
            return { skipped: `retry round ${data.round} is held by another job or was cancelled` };
        }
        if (!order || order.state !== this.options.dispatchState) {
            return { skipped: `order is ${order?.state ?? 'gone'}` };
        }
        if (data.round === 0) {
            // A fresh dispatch (the order was readied again): a retry left by the last one is void.
            await this.retries.cancel(order.code);
        }
        const route = await routeOf(ctx, this.connection, order);
        if (typeof route === 'string') {
            await this.updater.noteOnly(order.id, `Not sent to the dispatcher: ${route}`, { dispatcherDeliveryStatus: 'NOT_DISPATCHABLE' });
            return { skipped: route };
        }
        const channel = await this.connection.getRepository(ctx, Order).findOne({ where: { id: order.id }, relations: { channels: true } });
        const channelCode = channel?.channels.find(c => c.code !== '__default_channel__')?.code ?? '__default_channel__';
        let sent;
        try {
            sent = await this.client.ready(data.webhookId, {
                eventId: data.webhookId,
                sellerOrderId: order.code,
                channelId: channelCode,
                pickup: route.pickup,
                drop: route.drop,
            });
        } catch (e) {
            if (e instanceof RejectedError || e instanceof UnreachableError) {
                // The order stays ready: the admin can move it back to PaymentSettled and ready again.
                await this.updater.noteOnly(order.id, `The dispatcher did not take the order: ${e.message}`, { dispatcherDeliveryStatus: 'DISPATCH_FAILED' });
            }
            throw e;
        }
        const answer = sent.body;
        if (answer.assigned) {
            await this.updater.applyAnswer(order.id, 'assigned', answer);
            const now = await this.connection.getRepository(ctx, Order).findOne({ where: { id: order.id } });
            if (now?.state === 'Cancelled') {
                // Cancelled while the booking was in flight: free the driver.
                await this.queue.add({ kind: 'cancelled', orderId: String(order.id), sellerOrderId: order.code, webhookId: newWebhookId(), reason: 'cancelled in Vendure' });
            }
        } else if (answer.reason === 'AWAITING_ACCEPTANCE') {
            await this.updater.applyAnswer(order.id, 'awaiting', answer);
        } else {
            const { rounds, delayMs } = this.options.noDriverRetry;
            const retry = data.round < rounds ? { round: data.round + 1, dueAt: new Date(Date.now() + delayMs) } : undefined;
            await this.updater.applyAnswer(order.id, 'no-driver', answer, retry);
        }
        return { answer, attempts: sent.attempts, webhookId: data.webhookId };
    }
}
