/** A multi-vendor split: the seller orders of one customer order are dispatched separately. */
import { OrderType } from '@vendure/common/lib/generated-types';
import {
    ChannelService,
    EntityHydrator,
    idsAreEqual,
    Injector,
    mergeConfig,
    Order,
    OrderLine,
    OrderSellerStrategy,
    RequestContext,
    SplitOrderContents,
} from '@vendure/core';
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { waitFor } from './support/ports';
import { latLon, north, Stack, startStack, waitForOrder } from './support/stack';
import { adminOrder, checkout, gql, transitionOrder } from './support/vendure';

/**
 * The smallest seller strategy for a marketplace: a line belongs to the seller channel its variant
 * is assigned to, and the paid order splits into one seller order per channel.
 */
class TestSellerStrategy implements OrderSellerStrategy {
    private hydrator!: EntityHydrator;
    private channels!: ChannelService;

    init(injector: Injector): void {
        this.hydrator = injector.get(EntityHydrator);
        this.channels = injector.get(ChannelService);
    }

    async setOrderLineSellerChannel(ctx: RequestContext, line: OrderLine) {
        await this.hydrator.hydrate(ctx, line.productVariant, { relations: ['channels'] });
        const defaultChannel = await this.channels.getDefaultChannel();
        return line.productVariant.channels.find(c => !idsAreEqual(c.id, defaultChannel.id));
    }

    async splitOrder(_ctx: RequestContext, order: Order): Promise<SplitOrderContents[]> {
        const parts = new Map<string, SplitOrderContents>();
        for (const line of order.lines) {
            if (line.sellerChannelId == null) continue;
            const key = String(line.sellerChannelId);
            const part = parts.get(key) ?? { channelId: line.sellerChannelId, lines: [], shippingLines: order.shippingLines, state: 'PaymentSettled' };
            part.lines.push(line);
            parts.set(key, part);
        }
        return [...parts.values()];
    }
}

const ALEX = { lat: 52.5219, lon: 13.4132 }; // the drop lies between two shops 3 km apart
const SHOP_A = north(ALEX, -1.5);
const SHOP_B = north(ALEX, 1.5);

describe('Vendure multi-vendor split + dispatcher', { timeout: 900_000 }, () => {
    let stack: Stack;

    before(async () => {
        stack = await startStack({
            db: 'sqljs',
            configure: config => mergeConfig(config, { orderOptions: { orderSellerStrategy: new TestSellerStrategy() } }),
        });
    });

    after(async () => {
        await stack?.stop();
    });

    async function sellerChannel(name: string, at: { lat: number; lon: number }, productId: string): Promise<void> {
        const { createSeller } = await gql(stack.admin, `mutation ($input: CreateSellerInput!) { createSeller(input: $input) { id } }`, {
            input: { name, customFields: { pickupLatitude: at.lat, pickupLongitude: at.lon } },
        });
        const { activeChannel } = await gql(stack.admin, `{ activeChannel { defaultShippingZone { id } defaultTaxZone { id } } }`);
        const code = name.toLowerCase().replace(/\W+/g, '-');
        const { createChannel } = await gql(stack.admin, `mutation ($input: CreateChannelInput!) { createChannel(input: $input) {
            ... on Channel { id } ... on ErrorResult { errorCode message } } }`, {
            input: {
                code, token: `${code}-token`, sellerId: createSeller.id, defaultLanguageCode: 'en', pricesIncludeTax: false,
                defaultCurrencyCode: 'USD', defaultShippingZoneId: activeChannel.defaultShippingZone.id, defaultTaxZoneId: activeChannel.defaultTaxZone.id,
            },
        });
        assert.ok(createChannel.id, JSON.stringify(createChannel));
        await gql(stack.admin, `mutation ($input: AssignProductsToChannelInput!) { assignProductsToChannel(input: $input) { id } }`, {
            input: { productIds: [productId], channelId: createChannel.id },
        });
    }

    it('dispatches each seller order to a driver near its own shop, never the aggregate order', async () => {
        await sellerChannel('Bakery', SHOP_A, 'T_1');
        await sellerChannel('Roastery', SHOP_B, 'T_2');
        const driverA = await stack.dispatcher.onlineDriver('Near bakery', ...latLon(north(SHOP_A, -0.3)));
        const driverB = await stack.dispatcher.onlineDriver('Near roastery', ...latLon(north(SHOP_B, 0.3)));

        const placed = await checkout(stack.shop, ALEX, ['T_1', 'T_2']);
        assert.ok(placed.order, placed.error);
        const aggregate = await adminOrder(stack.admin, placed.order.id);
        assert.equal(aggregate.type, OrderType.Aggregate);
        assert.equal(aggregate.sellerOrders.length, 2);
        const refused = await transitionOrder(stack.admin, aggregate.id, 'ReadyForDispatch');
        assert.equal(refused.errorCode, 'ORDER_STATE_TRANSITION_ERROR');
        assert.match(refused.transitionError, /aggregate order is not dispatched/);

        for (const seller of aggregate.sellerOrders) {
            const ready = await transitionOrder(stack.admin, seller.id, 'ReadyForDispatch');
            assert.equal(ready.state, 'ReadyForDispatch', JSON.stringify(ready));
        }
        const booked = new Map<string, any>();
        for (const seller of aggregate.sellerOrders) {
            booked.set(seller.code, await waitForOrder(stack.admin, seller.id, `${seller.code} DriverAssigned`, o => o.state === 'DriverAssigned'));
        }
        const events = stack.proxy.requests.filter(r => r.path === '/events/seller-order-ready').map(r => JSON.parse(r.body));
        assert.deepEqual(events.map(e => e.sellerOrderId).sort(), aggregate.sellerOrders.map((s: any) => s.code).sort());
        assert.ok(!events.some(e => e.sellerOrderId === aggregate.code), 'the aggregate order is never sent');
        const byChannel = new Map(events.map(e => [e.channelId, e]));
        assert.deepEqual(byChannel.get('bakery')?.pickup, SHOP_A);
        assert.deepEqual(byChannel.get('roastery')?.pickup, SHOP_B);

        const drivers = new Map([[driverA.driverId, driverA], [driverB.driverId, driverB]]);
        const assignedDrivers = [...booked.values()].map(o => o.customFields.dispatcherDriverId).sort();
        assert.deepEqual(assignedDrivers, [...drivers.keys()].sort(), 'each seller order got its own driver');
        const bakeryOrder = byChannel.get('bakery')!.sellerOrderId;
        assert.equal(booked.get(bakeryOrder).customFields.dispatcherDriverId, driverA.driverId);

        for (const [code, order] of booked) {
            const driver = drivers.get(order.customFields.dispatcherDriverId)!;
            await stack.dispatcher.step(driver, code, 'picked-up');
            await stack.dispatcher.step(driver, code, 'delivered');
            await waitForOrder(stack.admin, order.id, `${code} Delivered`, o => o.state === 'Delivered');
        }
        await waitFor('outbox drained', async () => ((await stack.dispatcher.outboxPending()) === 0 ? true : undefined));
        const final = await adminOrder(stack.admin, aggregate.id);
        assert.equal(final.customFields.dispatcherDriverId, null, 'the aggregate order carries no driver');
    });
});
