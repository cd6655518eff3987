/** Where an order is picked up (its seller) and dropped (its shipping address), and the radius rule. */
import { Channel, Order, RequestContext, TransactionalConnection } from '@vendure/core';

import { haversineKm, LatLon, toLatLon } from './geo';

export interface Route {
    pickup: LatLon;
    drop: LatLon;
    distanceKm: number;
}

/** Why an order cannot be delivered by a driver; the text is shown to the customer at checkout. */
export function routeProblem(
    pickups: Array<{ seller: string; pickup: LatLon | undefined }>,
    drop: LatLon | undefined,
    radiusKm: number,
): string | undefined {
    if (!drop) {
        return 'The shipping address has no coordinates (dropLatitude, dropLongitude), so no driver can be sent.';
    }
    for (const { seller, pickup } of pickups) {
        if (!pickup) return `The seller "${seller}" has no pickup coordinates, so no driver can be sent.`;
        const km = haversineKm(pickup, drop);
        if (km > radiusKm) {
            return `The shipping address is ${km.toFixed(1)} km from the seller "${seller}"; delivery reaches ${radiusKm} km.`;
        }
    }
    return undefined;
}

export function dropOf(order: Order): LatLon | undefined {
    const fields = (order.shippingAddress as { customFields?: Record<string, unknown> } | undefined)?.customFields;
    return toLatLon(fields?.dropLatitude, fields?.dropLongitude);
}

/**
 * The sellers whose goods an order holds: each line's seller channel (multi-vendor), or else the
 * order's own non-default channel, or else the default channel's seller.
 */
export async function sellersOf(
    ctx: RequestContext,
    connection: TransactionalConnection,
    order: Order,
): Promise<Array<{ seller: string; pickup: LatLon | undefined }>> {
    const channelIds = new Set<string>();
    const full = await connection.getRepository(ctx, Order).findOne({
        where: { id: order.id },
        relations: { lines: true, channels: true },
    });
    for (const line of full?.lines ?? []) {
        if (line.sellerChannelId != null) channelIds.add(String(line.sellerChannelId));
    }
    if (channelIds.size === 0) {
        const channels = full?.channels ?? [];
        const own = channels.find(c => c.code !== '__default_channel__') ?? channels[0];
        if (own) channelIds.add(String(own.id));
    }
    const result: Array<{ seller: string; pickup: LatLon | undefined }> = [];
    for (const id of channelIds) {
        const channel = await connection.getRepository(ctx, Channel).findOne({
            where: { id },
            relations: { seller: true },
        });
        const seller = channel?.seller;
        result.push({
            seller: seller?.name ?? channel?.code ?? String(id),
            pickup: toLatLon(seller?.customFields?.pickupLatitude, seller?.customFields?.pickupLongitude),
        });
    }
    return result;
}

/** The route of one seller order (one seller); undefined with a reason when it has none. */
export async function routeOf(
    ctx: RequestContext,
    connection: TransactionalConnection,
    order: Order,
): Promise<Route | string> {
    const sellers = await sellersOf(ctx, connection, order);
    const drop = dropOf(order);
    const pickup = sellers[0]?.pickup;
    if (sellers.length !== 1 || !pickup || !drop) {
        return routeProblem(sellers, drop, Number.POSITIVE_INFINITY) ?? 'the order does not name exactly one seller';
    }
    return { pickup, drop, distanceKm: haversineKm(pickup, drop) };
}
