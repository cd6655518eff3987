/** The main loop on PostgreSQL, where the answer and the webhook for one booking really race. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { DeliveryUpdater, DispatcherDeliveryState, DispatchService, NoDriverRetries, RETRY_LEASE_MS } from '../src';
import { TransactionalConnection } from '@vendure/core';
import { Client } from 'pg';
import { latLon, mainLoop, north, Stack, startStack, waitForOrder } from './support/stack';
import { adminOrder, checkout, defaultSellerId, gql, notes, setSellerPickup, transitionOrder } from './support/vendure';
import { postWebhook, signedHeaders, webhookBody } from './support/webhooks';

const BERLIN = { lat: 52.52, lon: 13.405 };
const BREMEN = { lat: 53.079, lon: 8.801 };
const ESSEN = { lat: 51.456, lon: 7.012 };
const DORTMUND = { lat: 51.514, lon: 7.468 };
const KASSEL = { lat: 51.312, lon: 9.479 };

// One more dispatch round after "no driver", 5 s later; pollers check every half second.
const NO_DRIVER_RETRY = { rounds: 1, delayMs: 5_000, pollMs: 500 };

describe('Vendure (PostgreSQL) + dispatcher', { timeout: 900_000 }, () => {
    let stack: Stack;

    before(async () => {
        // Vendure's database is created on the dispatcher's embedded PostgreSQL, never on :5432.
        stack = await startStack({ db: 'postgres', plugin: { noDriverRetry: NO_DRIVER_RETRY } });
        // This Vendure's own poller is stopped: the tests below run pollers by hand, until the
        // restart test boots a fresh Vendure whose poller must find the retry by itself.
        stack.env.server.app.get(DispatchService).onApplicationShutdown();
    });

    /** A paid order at a shop in `city` (where no driver is yet), readied, answered "no driver". */
    async function noDriverOrder(city: { lat: number; lon: number }): Promise<{ id: string; code: string }> {
        await setSellerPickup(stack.admin, await defaultSellerId(stack.admin), city.lat, city.lon);
        const placed = await checkout(stack.shop, north(city, -1));
        assert.ok(placed.order, placed.error);
        await transitionOrder(stack.admin, placed.order.id, 'ReadyForDispatch');
        const waiting = await waitForOrder(stack.admin, placed.order.id, 'NO_DRIVER', o => o.customFields.dispatcherDeliveryStatus === 'NO_DRIVER');
        assert.equal(waiting.state, 'ReadyForDispatch');
        assert.ok(notes(waiting).some(n => n.includes('Dispatch round 1 is due at')), notes(waiting).join('\n'));
        return placed.order;
    }

    function readyEvents(code: string) {
        return stack.proxy.requests.filter(r => r.path === '/events/seller-order-ready' && JSON.parse(r.body).sellerOrderId === code);
    }

    async function retryRow(code: string): Promise<{ retryRound: number; retryAt: Date | null; retryJob: string | null }> {
        // Read with a client of its own: the test also reads while Vendure is down.
        const client = new Client({ connectionString: vendureDsn });
        await client.connect();
        try {
            const { rows } = await client.query(
                'SELECT "retryRound", "retryAt", "retryJob" FROM dispatcher_delivery_state WHERE "sellerOrderId" = $1',
                [code],
            );
            assert.equal(rows.length, 1, `no delivery state row for ${code}`);
            return rows[0];
        } finally {
            await client.end();
        }
    }

    let vendureDsn = '';
    before(() => {
        const options = stack.env.server.app.get(TransactionalConnection).rawConnection.options as { database?: string };
        const url = new URL(stack.dispatcher.postgresUrl);
        url.pathname = `/${options.database}`;
        vendureDsn = url.toString();
    });

    after(async () => {
        await stack?.stop();
    });

    it('checkout → ready → booked → picked up → delivered ends Delivered with the driver', async () => {
        const type = stack.env.server.app.get(TransactionalConnection).rawConnection.options.type;
        assert.equal(type, 'postgres');
        await mainLoop(stack, BERLIN);
    });

    it('answers and delivery.assigned webhooks for one booking, all at once, apply once', async () => {
        await setSellerPickup(stack.admin, await defaultSellerId(stack.admin), BREMEN.lat, BREMEN.lon);
        const placed = await checkout(stack.shop, north(BREMEN, -1));
        assert.ok(placed.order);
        const { id, code } = placed.order;
        await transitionOrder(stack.admin, id, 'ReadyForDispatch');
        // No driver in Bremen: the order waits in ReadyForDispatch, unbooked.
        await waitForOrder(stack.admin, id, 'NO_DRIVER', o => o.customFields.dispatcherDeliveryStatus === 'NO_DRIVER');

        const updater = stack.env.server.app.get(DeliveryUpdater);
        const fact = { sellerOrderId: code, driverId: 'drv_race', assignmentId: 'asg_race', distanceKm: 0.7 };
        const orderId = (await stack.env.server.app.get(TransactionalConnection).rawConnection
            .getRepository(DispatcherDeliveryState).findOneByOrFail({ sellerOrderId: code })).orderId;
        const body = webhookBody('delivery.assigned', { ...fact, sequence: 1 });
        const results = await Promise.all([
            ...Array.from({ length: 4 }, () => updater.applyAnswer(orderId, 'assigned', fact)),
            ...Array.from({ length: 4 }, () => postWebhook(stack.vendurePort, body, signedHeaders(body))),
        ]);
        const outcomes = results.slice(4).map(r => (r as { body: { outcome: string } }).body.outcome);
        assert.ok(outcomes.every(o => o === 'applied' || o === 'stale'), outcomes.join());

        const order = await adminOrder(stack.admin, id);
        assert.equal(order.state, 'DriverAssigned');
        assert.equal(order.customFields.dispatcherDriverId, 'drv_race');
        assert.equal(notes(order).filter(n => n.startsWith('Driver drv_race assigned')).length, 1, notes(order).join('\n'));
        const transitions = (order.history.items as any[]).filter(h => h.type === 'ORDER_STATE_TRANSITION' && h.data.to === 'DriverAssigned');
        assert.equal(transitions.length, 1);
        assert.equal(outcomes.filter(o => o === 'applied').length, 1, 'one webhook wins the sequence');
    });

    it('two pollers racing for one due retry queue one job, and the round books the driver', async () => {
        const service = stack.env.server.app.get(DispatchService);
        const order = await noDriverOrder(ESSEN);
        const pending = await retryRow(order.code);
        assert.equal(pending.retryRound, 1);
        assert.ok(pending.retryAt, 'the retry is stored with the order');
        assert.equal(pending.retryJob, null);
        const driver = await stack.dispatcher.onlineDriver('Essen', ...latLon(north(ESSEN, 0.4)));

        // Both pollers see the retry due (as after its delay) and race for it on two connections.
        const due = new Date(Date.now() + NO_DRIVER_RETRY.delayMs + 1_000);
        const queued = await Promise.all([service.pollRetries(due), service.pollRetries(due)]);
        const forThis = queued.map(codes => codes.filter(c => c === order.code).length);
        assert.deepEqual(forThis.sort(), [0, 1], 'exactly one poller queued a job for the order');

        const assigned = await waitForOrder(stack.admin, order.id, 'DriverAssigned', o => o.state === 'DriverAssigned');
        assert.equal(assigned.customFields.dispatcherDriverId, driver.driverId);
        const { jobs } = await gql(stack.admin, `query { jobs(options: { filter: { queueName: { eq: "dispatcher-events" } }, take: 1000 }) { items { data } } }`);
        const rounds = (jobs.items as Array<{ data: { sellerOrderId: string; round?: number } }>)
            .filter(j => j.data.sellerOrderId === order.code)
            .map(j => j.data.round);
        assert.deepEqual(rounds.sort(), [0, 1], 'one job for the first round, one for the retry');
        const sent = readyEvents(order.code);
        assert.equal(sent.length, 2);
        assert.notEqual(sent[0].headers['webhook-id'], sent[1].headers['webhook-id'], 'a new round is a new event');
        const after = await retryRow(order.code);
        assert.equal(after.retryAt, null, 'the retry was consumed');
        assert.equal(after.retryJob, sent[1].headers['webhook-id']);
        // Nothing is left to take, however late a poller looks.
        assert.deepEqual((await service.pollRetries(new Date(Date.now() + 86_400_000))).filter(c => c === order.code), []);
        assert.equal(readyEvents(order.code).length, 2);
        assert.equal((await stack.dispatcher.delivery(order.code)).driverId, driver.driverId);
    });

    it('a poller that took a retry and died before queuing its job delays the retry, never loses it', async () => {
        const service = stack.env.server.app.get(DispatchService);
        const order = await noDriverOrder(KASSEL);
        const due = new Date(Date.now() + NO_DRIVER_RETRY.delayMs + 1_000);
        // The first half of a poll: the retry is taken (lease + job id written), then "the crash".
        const taken = await stack.env.server.app.get(NoDriverRetries).take(order.code, due);
        assert.ok(taken);
        assert.equal((await retryRow(order.code)).retryJob, taken.webhookId);
        // Within the lease nobody takes it again; after the lease the next poller does.
        assert.deepEqual((await service.pollRetries(new Date(due.getTime() + 1_000))).filter(c => c === order.code), []);
        const driver = await stack.dispatcher.onlineDriver('Kassel', ...latLon(north(KASSEL, 0.4)));
        const later = await service.pollRetries(new Date(due.getTime() + RETRY_LEASE_MS + 1_000));
        assert.deepEqual(later.filter(c => c === order.code), [order.code]);
        const assigned = await waitForOrder(stack.admin, order.id, 'DriverAssigned', o => o.state === 'DriverAssigned');
        assert.equal(assigned.customFields.dispatcherDriverId, driver.driverId);
        const sent = readyEvents(order.code);
        assert.equal(sent.length, 2);
        assert.notEqual(sent[1].headers['webhook-id'], taken.webhookId, 'the retaken round runs under a new id');
        assert.equal((await retryRow(order.code)).retryAt, null);
    });

    it('a no-driver retry survives a restart of Vendure and books the driver who came online meanwhile', async () => {
        const order = await noDriverOrder(DORTMUND);
        await stack.env.server.destroy();
        // Vendure is down: the retry is still there, untaken, in its database.
        const pending = await retryRow(order.code);
        assert.equal(pending.retryRound, 1);
        assert.ok(pending.retryAt);
        assert.equal(pending.retryJob, null);
        const driver = await stack.dispatcher.onlineDriver('Dortmund', ...latLon(north(DORTMUND, 0.4)));

        await stack.env.server.bootstrap();
        await stack.admin.asSuperAdmin();
        const assigned = await waitForOrder(stack.admin, order.id, 'DriverAssigned after the restart', o => o.state === 'DriverAssigned');
        assert.equal(assigned.customFields.dispatcherDriverId, driver.driverId);
        const sent = readyEvents(order.code);
        assert.equal(sent.length, 2, 'the first round before the restart, the retry after it');
        assert.equal(JSON.parse(sent[1].response ?? '{}').assigned, true);
        const after = await retryRow(order.code);
        assert.equal(after.retryAt, null);
        assert.equal(after.retryJob, sent[1].headers['webhook-id']);
        const n = notes(assigned);
        assert.equal(n.filter(x => x.startsWith('No driver available')).length, 1, n.join('\n'));
        assert.equal(n.filter(x => x.startsWith(`Driver ${driver.driverId} assigned`)).length, 1, n.join('\n'));
        assert.equal((await stack.dispatcher.delivery(order.code)).driverId, driver.driverId);
    });
});
