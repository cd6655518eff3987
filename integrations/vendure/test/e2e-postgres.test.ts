/** The main loop on PostgreSQL, where the answer and the webhook for one booking really race. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { DeliveryUpdater, DispatcherDeliveryState } from '../src';
import { TransactionalConnection } from '@vendure/core';
import { mainLoop, north, Stack, startStack, waitForOrder } from './support/stack';
import { adminOrder, checkout, defaultSellerId, notes, setSellerPickup, transitionOrder } from './support/vendure';
import { postWebhook, signedHeaders, webhookBody } from './support/webhooks';

const BERLIN = { lat: 52.52, lon: 13.405 };
const BREMEN = { lat: 53.079, lon: 8.801 };

describe('Vendure (PostgreSQL) + dispatcher', { timeout: 900_000 }, () => {
    let stack: Stack;

    before(async () => {
        // Vendure's database is created on the dispatcher's embedded PostgreSQL, never on :5432.
        stack = await startStack({ db: 'postgres' });
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
});
