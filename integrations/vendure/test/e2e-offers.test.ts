/** Offer mode (DISPATCHER_OFFER_MODE=cascade): the order waits, the driver accepts, the webhook books it. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { waitFor } from './support/ports';
import { latLon, north, Stack, startStack, waitForOrder } from './support/stack';
import { adminOrder, checkout, defaultSellerId, notes, setSellerPickup, transitionOrder } from './support/vendure';

const HANOVER = { lat: 52.375, lon: 9.732 };

describe('Vendure (sql.js) + dispatcher in cascade offer mode', { timeout: 900_000 }, () => {
    let stack: Stack;

    before(async () => {
        stack = await startStack({ db: 'sqljs', dispatcherEnv: { DISPATCHER_OFFER_MODE: 'cascade', DISPATCHER_OFFER_TIMEOUT_S: '60' } });
    });

    after(async () => {
        await stack?.stop();
    });

    it('waits for the driver to accept, then becomes DriverAssigned by webhook', async t => {
        const driver = await stack.dispatcher.onlineDriver('Offered', ...latLon(north(HANOVER, 0.4)));
        await setSellerPickup(stack.admin, await defaultSellerId(stack.admin), HANOVER.lat, HANOVER.lon);
        const placed = await checkout(stack.shop, north(HANOVER, -1));
        assert.ok(placed.order);
        const { id, code } = placed.order;
        await transitionOrder(stack.admin, id, 'ReadyForDispatch');
        const sent = await waitFor('the ready answer', async () =>
            stack.proxy.requests.find(r => r.path === '/events/seller-order-ready' && JSON.parse(r.body).sellerOrderId === code && r.response),
        );
        const answer = JSON.parse(sent.response!);
        if (answer.reason !== 'AWAITING_ACCEPTANCE') {
            // This dispatcher books at once whatever DISPATCHER_OFFER_MODE says: offers are not built
            // into it yet. The plugin's side is in place; this test runs for real once they are.
            t.skip(`dispatcher answered ${JSON.stringify(answer)} in cascade mode: offers (DISPATCHER_OFFER_MODE) are not supported by this dispatcher yet`);
            return;
        }
        const waiting = await waitForOrder(stack.admin, id, 'AWAITING_ACCEPTANCE', o => o.customFields.dispatcherDeliveryStatus === 'AWAITING_ACCEPTANCE');
        assert.equal(waiting.state, 'ReadyForDispatch');
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
    });
});
