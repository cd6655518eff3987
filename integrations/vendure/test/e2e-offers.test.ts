/**
 * Offer mode (DISPATCHER_OFFER_MODE=cascade): the order waits, the driver accepts, the webhook books it.
 * This shop dispatches on payment (`dispatchState: 'PaymentSettled'`): checkout alone sends the order.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { waitFor } from './support/ports';
import { latLon, north, Stack, startStack, waitForOrder } from './support/stack';
import { adminOrder, checkout, defaultSellerId, notes, setSellerPickup } from './support/vendure';

const HANOVER = { lat: 52.375, lon: 9.732 };

describe('Vendure (sql.js) + dispatcher in cascade offer mode, dispatching on PaymentSettled', { timeout: 900_000 }, () => {
    let stack: Stack;

    before(async () => {
        stack = await startStack({
            db: 'sqljs',
            dispatcherEnv: { DISPATCHER_OFFER_MODE: 'cascade', DISPATCHER_OFFER_TIMEOUT_S: '60' },
            plugin: { dispatchState: 'PaymentSettled' },
        });
    });

    after(async () => {
        await stack?.stop();
    });

    it('waits for the driver to accept, then becomes DriverAssigned by webhook', async () => {
        const driver = await stack.dispatcher.onlineDriver('Offered', ...latLon(north(HANOVER, 0.4)));
        await setSellerPickup(stack.admin, await defaultSellerId(stack.admin), HANOVER.lat, HANOVER.lon);
        const placed = await checkout(stack.shop, north(HANOVER, -1));
        assert.ok(placed.order);
        const { id, code } = placed.order;
        // No admin step: entering PaymentSettled (the configured state) sent the order.
        assert.equal(placed.order.state, 'PaymentSettled');
        const sent = await waitFor('the ready answer', async () =>
            stack.proxy.requests.find(r => r.path === '/events/seller-order-ready' && JSON.parse(r.body).sellerOrderId === code && r.response),
        );
        const answer = JSON.parse(sent.response!);
        assert.equal(answer.reason, 'AWAITING_ACCEPTANCE', JSON.stringify(answer));
        const waiting = await waitForOrder(stack.admin, id, 'AWAITING_ACCEPTANCE', o => o.customFields.dispatcherDeliveryStatus === 'AWAITING_ACCEPTANCE');
        assert.equal(waiting.state, 'PaymentSettled');
        assert.equal(waiting.customFields.dispatcherDriverId, null);

        const offer = await waitFor('an open offer', async () => {
            const { body } = await stack.dispatcher.call('GET', `/drivers/${driver.driverId}/offers?status=OPEN`, undefined, driver.token);
            return (body?.offers ?? []).find((o: any) => o.sellerOrderId === code);
        });
        const accepted = await stack.dispatcher.call('POST', `/drivers/${driver.driverId}/offers/${offer.offerId}/accept`, {}, driver.token);
        assert.equal(accepted.status, 200, JSON.stringify(accepted.body));

        const assigned = await waitForOrder(stack.admin, id, 'DriverAssigned', o => o.state === 'DriverAssigned');
        assert.equal(assigned.customFields.dispatcherDriverId, driver.driverId);
        assert.equal(assigned.customFields.dispatcherAssignmentId, accepted.body.assignmentId);
        const n = notes(await adminOrder(stack.admin, id));
        assert.equal(n.filter(x => x.includes('from the delivery.assigned webhook')).length, 1, n.join('\n'));
        assert.equal((await stack.dispatcher.delivery(code)).driverId, driver.driverId);

        // The rest of the loop from a PaymentSettled dispatch: picked up, delivered.
        await stack.dispatcher.step(driver, code, 'picked-up');
        await waitForOrder(stack.admin, id, 'Shipped', o => o.state === 'Shipped');
        await stack.dispatcher.step(driver, code, 'delivered');
        const done = await waitForOrder(stack.admin, id, 'Delivered', o => o.state === 'Delivered');
        assert.equal(done.customFields.dispatcherDeliveryStatus, 'DELIVERED');
        const states = (done.history.items as any[]).filter(h => h.type === 'ORDER_STATE_TRANSITION').map(h => h.data.to as string);
        assert.deepEqual(states.slice(-4), ['PaymentSettled', 'DriverAssigned', 'Shipped', 'Delivered']);
        const sentForOrder = stack.proxy.requests.filter(r => r.path === '/events/seller-order-ready' && JSON.parse(r.body).sellerOrderId === code);
        assert.equal(sentForOrder.length, 1, 'one event, sent on payment');
    });
});
