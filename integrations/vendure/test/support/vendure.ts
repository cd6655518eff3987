/** A Vendure test server with the plugin, a settle-at-once payment method, and GraphQL helpers. */
import { LanguageCode } from '@vendure/common/lib/generated-types';
import { parse } from 'graphql';
import { mergeConfig, PaymentMethodHandler, VendureConfig } from '@vendure/core';
import { InitialData } from '@vendure/core/dist/data-import/types';
import {
    createTestEnvironment,
    PostgresInitializer,
    registerInitializer,
    SimpleGraphQLClient,
    SqljsInitializer,
    TestEnvironment,
    testConfig,
} from '@vendure/testing';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { DispatcherPlugin, DispatcherPluginOptions } from '../../src';
import { INBOUND_SECRET, WEBHOOK_SECRET } from './dispatcher';

// Tests make no calls home.
process.env.VENDURE_DISABLE_TELEMETRY = 'true';

export const testPaymentHandler = new PaymentMethodHandler({
    code: 'test-payment',
    description: [{ languageCode: LanguageCode.en, value: 'Settles at once' }],
    args: {},
    createPayment: (_ctx, _order, amount) => ({ amount, state: 'Settled' as const, transactionId: 'test' }),
    settlePayment: () => ({ success: true }),
});

export const initialData: InitialData = {
    defaultLanguage: LanguageCode.en,
    defaultZone: 'Europe',
    taxRates: [{ name: 'Standard Tax', percentage: 20 }],
    shippingMethods: [{ name: 'Driver delivery', price: 500 }],
    paymentMethods: [{ name: 'test-payment', handler: { code: testPaymentHandler.code, arguments: [] } }],
    countries: [{ name: 'Germany', code: 'DE', zone: 'Europe' }],
    collections: [],
};

export const productsCsvPath = path.join(__dirname, '../../../test/fixtures/products.csv');

export type Database = { type: 'sqljs' } | { type: 'postgres'; url: string };

let sqljsDir: string | undefined;

/** Register the initializer; sql.js gets a fresh directory so no stale cached schema is reused. */
function databaseOptions(db: Database): VendureConfig['dbConnectionOptions'] {
    if (db.type === 'sqljs') {
        sqljsDir = mkdtempSync(path.join(tmpdir(), 'vendure-sqljs-'));
        registerInitializer('sqljs', new SqljsInitializer(sqljsDir));
        return testConfig.dbConnectionOptions;
    }
    registerInitializer('postgres', new PostgresInitializer());
    const url = new URL(db.url);
    return {
        type: 'postgres',
        host: url.hostname,
        port: Number(url.port),
        username: decodeURIComponent(url.username || 'postgres'),
        password: decodeURIComponent(url.password),
        database: 'vendure', // replaced by the initializer with a per-file database
        synchronize: true,
        logging: false,
    };
}

export function cleanupDatabaseFiles(): void {
    if (sqljsDir) rmSync(sqljsDir, { recursive: true, force: true });
}

export function createVendure(
    port: number,
    db: Database,
    dispatcherUrl: string,
    extra: Partial<DispatcherPluginOptions> = {},
    configure: (config: VendureConfig) => VendureConfig = c => c,
): TestEnvironment {
    const config = mergeConfig(testConfig, {
        apiOptions: { port },
        dbConnectionOptions: databaseOptions(db),
        paymentOptions: { paymentMethodHandlers: [testPaymentHandler] },
        plugins: [
            DispatcherPlugin.init({
                dispatcherUrl,
                outboundSecret: INBOUND_SECRET,
                webhookSecret: WEBHOOK_SECRET,
                retry: { attempts: 8, initialDelayMs: 300, maxDelayMs: 3000 },
                // Generous: a crowded machine must not turn a slow answer into a retry.
                requestTimeoutMs: 120_000,
                ...extra,
            }),
        ],
    });
    return createTestEnvironment(configure(config) as Required<VendureConfig>);
}

async function gql(client: SimpleGraphQLClient, query: string, variables?: Record<string, unknown>): Promise<any> {
    return client.query(parse(query), variables);
}

export const ORDER_FIELDS = `
    id code state type
    customFields { dispatcherDriverId dispatcherAssignmentId dispatcherDeliveryStatus dispatcherDistanceKm }
    history(options: { take: 100, sort: { createdAt: ASC } }) { items { type data } }
    fulfillments { id state method trackingCode }
`;

export async function adminOrder(admin: SimpleGraphQLClient, id: string): Promise<any> {
    const { order } = await gql(admin, `query ($id: ID!) { order(id: $id) { ${ORDER_FIELDS} sellerOrders { id code state type } } }`, { id });
    return order;
}

export function notes(order: any): string[] {
    return (order.history.items as Array<{ type: string; data: { note?: string } }>)
        .filter(h => h.type === 'ORDER_NOTE')
        .map(h => h.data.note ?? '');
}

export async function setSellerPickup(admin: SimpleGraphQLClient, sellerId: string, lat: number, lon: number): Promise<void> {
    await gql(admin, `mutation ($id: ID!, $lat: Float, $lon: Float) {
        updateSeller(input: { id: $id, customFields: { pickupLatitude: $lat, pickupLongitude: $lon } }) { id }
    }`, { id: sellerId, lat, lon });
}

export async function defaultSellerId(admin: SimpleGraphQLClient): Promise<string> {
    const { activeChannel } = await gql(admin, `{ activeChannel { seller { id } } }`);
    return activeChannel.seller.id;
}

export interface CheckoutResult {
    order?: { id: string; code: string; state: string };
    error?: string;
}

/** A guest buys the given variants (quantity 1 each) and pays; a refused transition comes back as `error`. */
export async function checkout(
    shop: SimpleGraphQLClient,
    drop: { lat: number; lon: number } | undefined,
    variantIds: string[] = ['T_1'],
    shippingMethodIds?: string[],
): Promise<CheckoutResult> {
    await shop.asAnonymousUser();
    for (const variantId of variantIds) {
        const { addItemToOrder } = await gql(shop, `mutation ($v: ID!) { addItemToOrder(productVariantId: $v, quantity: 1) {
            ... on Order { id } ... on ErrorResult { errorCode message } } }`, { v: variantId });
        if (addItemToOrder.errorCode) throw new Error(addItemToOrder.message);
    }
    await gql(shop, `mutation { setCustomerForOrder(input: { emailAddress: "guest-${Date.now()}@example.com", firstName: "Gia", lastName: "Guest" }) {
        ... on Order { id } ... on ErrorResult { errorCode message } } }`);
    const customFields = drop ? { dropLatitude: drop.lat, dropLongitude: drop.lon } : {};
    const { setOrderShippingAddress } = await gql(shop, `mutation ($input: CreateAddressInput!) { setOrderShippingAddress(input: $input) {
        ... on Order { id } ... on ErrorResult { errorCode message } } }`, {
        input: { fullName: 'Gia Guest', streetLine1: 'Unter den Linden 1', city: 'Berlin', countryCode: 'DE', customFields },
    });
    if (setOrderShippingAddress.errorCode) throw new Error(setOrderShippingAddress.message);
    let methods = shippingMethodIds;
    if (!methods) {
        const { eligibleShippingMethods } = await gql(shop, `{ eligibleShippingMethods { id } }`);
        methods = [eligibleShippingMethods[0].id as string];
    }
    const { setOrderShippingMethod } = await gql(shop, `mutation ($ids: [ID!]!) { setOrderShippingMethod(shippingMethodId: $ids) {
        ... on Order { id } ... on ErrorResult { errorCode message } } }`, { ids: methods });
    if (setOrderShippingMethod.errorCode) throw new Error(setOrderShippingMethod.message);
    const { transitionOrderToState } = await gql(shop, `mutation { transitionOrderToState(state: "ArrangingPayment") {
        ... on Order { id state } ... on OrderStateTransitionError { errorCode message transitionError } } }`);
    if (transitionOrderToState.errorCode) return { error: transitionOrderToState.transitionError };
    const { addPaymentToOrder } = await gql(shop, `mutation { addPaymentToOrder(input: { method: "test-payment", metadata: {} }) {
        ... on Order { id code state } ... on ErrorResult { errorCode message } } }`);
    if (addPaymentToOrder.errorCode) throw new Error(addPaymentToOrder.message);
    return { order: addPaymentToOrder };
}

export async function transitionOrder(admin: SimpleGraphQLClient, id: string, state: string): Promise<any> {
    const { transitionOrderToState } = await gql(admin, `mutation ($id: ID!, $state: String!) { transitionOrderToState(id: $id, state: $state) {
        ... on Order { id state } ... on OrderStateTransitionError { errorCode message transitionError } } }`, { id, state });
    return transitionOrderToState;
}

export async function cancelOrder(admin: SimpleGraphQLClient, id: string): Promise<any> {
    const { cancelOrder } = await gql(admin, `mutation ($id: ID!) { cancelOrder(input: { orderId: $id, reason: "customer changed mind" }) {
        ... on Order { id state } ... on ErrorResult { errorCode message } } }`, { id });
    return cancelOrder;
}

export { gql };
