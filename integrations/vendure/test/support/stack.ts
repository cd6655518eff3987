/** One Vendure test server + one real dispatcher + a recording proxy between them, and the main loop. */
import { VendureConfig } from '@vendure/core';
import { SimpleGraphQLClient, TestEnvironment } from '@vendure/testing';
import assert from 'node:assert/strict';

import { DispatcherPluginOptions } from '../../src';
import { Dispatcher } from './dispatcher';
import { freePort, waitFor } from './ports';
import { RecordingProxy } from './proxy';
import {
    adminOrder,
    checkout,
    cleanupDatabaseFiles,
    createVendure,
    Database,
    defaultSellerId,
    initialData,
    notes,
    productsCsvPath,
    setSellerPickup,
    transitionOrder,
} from './vendure';

export interface Stack {
    env: TestEnvironment;
    dispatcher: Dispatcher;
    proxy: RecordingProxy;
    admin: SimpleGraphQLClient;
    shop: SimpleGraphQLClient;
    vendurePort: number;
    stop(): Promise<void>;
}

export interface StackOptions {
    db: 'sqljs' | 'postgres';
    dispatcherEnv?: Record<string, string>;
    plugin?: Partial<DispatcherPluginOptions>;
    configure?: (config: VendureConfig) => VendureConfig;
}

export async function startStack(options: StackOptions): Promise<Stack> {
    const vendurePort = await freePort();
    const proxy = new RecordingProxy();
    const proxyUrl = await proxy.start();
    const dispatcher = new Dispatcher();
    // Started first: on PostgreSQL, Vendure's database lives on the dispatcher's embedded server.
    await dispatcher.start(`http://127.0.0.1:${vendurePort}/dispatcher/webhooks`, options.dispatcherEnv);
    proxy.target = dispatcher.url;
    const db: Database = options.db === 'sqljs' ? { type: 'sqljs' } : { type: 'postgres', url: dispatcher.postgresUrl };
    const env = createVendure(vendurePort, db, proxyUrl, options.plugin, options.configure);
    try {
        await env.server.init({ initialData, productsCsvPath, customerCount: 1 });
    } catch (e) {
        await dispatcher.stop();
        await proxy.stop();
        throw e;
    }
    await env.adminClient.asSuperAdmin();
    return {
        env,
        dispatcher,
        proxy,
        admin: env.adminClient,
        shop: env.shopClient,
        vendurePort,
        async stop() {
            await env.server.destroy();
            await dispatcher.stop();
            await proxy.stop();
            cleanupDatabaseFiles();
        },
    };
}

export async function waitForOrder(admin: SimpleGraphQLClient, id: string, what: string, check: (order: any) => boolean, timeoutMs = 180_000): Promise<any> {
    let last: any;
    try {
        return await waitFor(what, async () => {
            last = await adminOrder(admin, id);
            return check(last) ? last : undefined;
        }, timeoutMs);
    } catch (e) {
        const seen = last ? ` (order ${last.code} is ${last.state}, ${JSON.stringify(last.customFields)}, notes: ${notes(last).join(' | ')})` : '';
        throw new Error(`${(e as Error).message}${seen}`);
    }
}

/** Move ~`km` north of a point (for placing drivers at known distances). */
export function north(point: { lat: number; lon: number }, km: number): { lat: number; lon: number } {
    return { lat: point.lat + km / 111.2, lon: point.lon };
}

/**
 * Checkout → ready → the nearest driver is booked → picks up → delivers → Vendure order Delivered,
 * with the driver and one history note per step.
 */
export async function mainLoop(stack: Stack, shopAt: { lat: number; lon: number }): Promise<void> {
    const { admin, shop, dispatcher } = stack;
    await setSellerPickup(admin, await defaultSellerId(admin), shopAt.lat, shopAt.lon);
    const far = await dispatcher.onlineDriver('Far', ...latLon(north(shopAt, 2.0)));
    const near = await dispatcher.onlineDriver('Near', ...latLon(north(shopAt, 0.3)));

    const placed = await checkout(shop, north(shopAt, -1.5));
    assert.ok(placed.order, `checkout refused: ${placed.error}`);
    const { id, code } = placed.order;
    assert.equal(placed.order.state, 'PaymentSettled');

    const ready = await transitionOrder(admin, id, 'ReadyForDispatch');
    assert.equal(ready.state, 'ReadyForDispatch', JSON.stringify(ready));

    const assigned = await waitForOrder(admin, id, 'DriverAssigned', o => o.state === 'DriverAssigned');
    assert.equal(assigned.customFields.dispatcherDriverId, near.driverId);
    assert.ok(assigned.customFields.dispatcherAssignmentId?.startsWith('asg_'));
    assert.equal(assigned.customFields.dispatcherDeliveryStatus, 'ASSIGNED');
    assert.ok(Math.abs(assigned.customFields.dispatcherDistanceKm - 0.3) < 0.05);
    const booked = await dispatcher.delivery(code);
    assert.equal(booked.status, 'ASSIGNED');
    assert.equal(booked.driverId, near.driverId);
    assert.equal((await dispatcher.driver(far.driverId)).status, 'AVAILABLE');

    await dispatcher.step(near, code, 'picked-up');
    await waitForOrder(admin, id, 'Shipped', o => o.state === 'Shipped');
    await dispatcher.step(near, code, 'delivered');
    const done = await waitForOrder(admin, id, 'Delivered', o => o.state === 'Delivered');
    // Every webhook delivered, so a late duplicate "assigned" would have shown by now.
    await waitFor('outbox drained', async () => ((await dispatcher.outboxPending()) === 0 ? true : undefined));
    const final = await adminOrder(admin, id);

    assert.equal(final.customFields.dispatcherDriverId, near.driverId);
    assert.equal(final.customFields.dispatcherDeliveryStatus, 'DELIVERED');
    assert.equal(final.fulfillments.length, 1);
    assert.equal(final.fulfillments[0].state, 'Delivered');
    assert.equal(final.fulfillments[0].trackingCode, assigned.customFields.dispatcherAssignmentId);
    const n = notes(final);
    assert.equal(n.filter(t => t.startsWith(`Driver ${near.driverId} assigned`)).length, 1, n.join('\n'));
    assert.equal(n.filter(t => t.includes('picked the order up')).length, 1, n.join('\n'));
    assert.equal(n.filter(t => t.includes('delivered the order')).length, 1, n.join('\n'));
    const states = (final.history.items as any[])
        .filter(h => h.type === 'ORDER_STATE_TRANSITION')
        .map(h => h.data.to as string);
    assert.deepEqual(states.slice(-4), ['ReadyForDispatch', 'DriverAssigned', 'Shipped', 'Delivered']);
    assert.equal(done.state, 'Delivered');
    assert.equal((await dispatcher.driver(near.driverId)).status, 'AVAILABLE');
}

export function latLon(p: { lat: number; lon: number }): [number, number] {
    return [p.lat, p.lon];
}

export { cleanupDatabaseFiles };
