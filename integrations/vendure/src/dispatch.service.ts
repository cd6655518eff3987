/** Sends seller-order-ready / -cancelled through Vendure's job queue and applies the answers. */
import { Inject, Injectable, OnApplicationBootstrap } from '@nestjs/common';
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
import { ResolvedOptions } from './options';
import { newWebhookId } from './signing';

/** One queued event. The webhook-id is fixed when the job is created, so every retry reuses it. */
export type DispatchJobData =
    | { kind: 'ready'; orderId: string; sellerOrderId: string; webhookId: string; round: number }
    | { kind: 'cancelled'; orderId: string; sellerOrderId: string; webhookId: string; reason: string };

@Injectable()
export class DispatchService implements OnApplicationBootstrap {
    private queue!: JobQueue<DispatchJobData>;
    private readonly client: DispatcherClient;

    constructor(
        @Inject(DISPATCHER_PLUGIN_OPTIONS) private readonly options: ResolvedOptions,
        private readonly jobQueueService: JobQueueService,
        private readonly eventBus: EventBus,
        private readonly connection: TransactionalConnection,
        private readonly updater: DeliveryUpdater,
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
        if (!order || order.state !== this.options.dispatchState) {
            return { skipped: `order is ${order?.state ?? 'gone'}` };
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
            await this.updater.applyAnswer(order.id, 'no-driver', answer);
            const { rounds, delayMs } = this.options.noDriverRetry;
            if (data.round < rounds) {
                setTimeout(() => {
                    this.enqueueReady(order.id, order.code, data.round + 1).catch(e =>
                        Logger.error(`re-dispatch of ${order.code} failed: ${String(e)}`, LOGGER_CTX),
                    );
                }, delayMs).unref();
            }
        }
        return { answer, attempts: sent.attempts, webhookId: data.webhookId };
    }
}
