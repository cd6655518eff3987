/** The order process: ReadyForDispatch and DriverAssigned, and the checkout radius check. */
import { OrderType } from '@vendure/common/lib/generated-types';
import { CustomOrderProcess, Injector, TransactionalConnection } from '@vendure/core';

import { DRIVER_ASSIGNED_STATE } from './constants';
import { dropOf, routeProblem, sellersOf } from './locations';
import { ResolvedOptions } from './options';

declare module '@vendure/core/dist/service/helpers/order-state-machine/order-state' {
    interface CustomOrderStates {
        ReadyForDispatch: never;
        DriverAssigned: never;
    }
}

export function dispatcherOrderProcess(
    options: ResolvedOptions,
): CustomOrderProcess<'ReadyForDispatch' | 'DriverAssigned'> {
    let connection: TransactionalConnection;
    const dispatchState = options.dispatchState;
    // Shipped comes from the driver's fulfillment; going back to ReadyForDispatch re-dispatches.
    const afterAssigned = ['Shipped', 'PartiallyShipped', 'ReadyForDispatch', 'Cancelled', 'Modifying'];
    const transitions: Record<string, { to: string[]; mergeStrategy?: 'merge' | 'replace' }> = {
        PaymentSettled: { to: ['ReadyForDispatch'], mergeStrategy: 'merge' },
        ReadyForDispatch: {
            to: [DRIVER_ASSIGNED_STATE, 'PaymentSettled', 'Shipped', 'PartiallyShipped', 'Cancelled', 'Modifying'],
        },
        [DRIVER_ASSIGNED_STATE]: { to: afterAssigned },
    };
    if (dispatchState !== 'ReadyForDispatch') {
        // A shop that dispatches on another state (e.g. PaymentSettled) books from there.
        transitions[dispatchState] = {
            to: [...(transitions[dispatchState]?.to ?? []), DRIVER_ASSIGNED_STATE],
            mergeStrategy: 'merge',
        };
    }
    return {
        transitions: transitions as unknown as CustomOrderProcess<'ReadyForDispatch' | 'DriverAssigned'>['transitions'],
        init(injector: Injector) {
            connection = injector.get(TransactionalConnection);
        },
        async onTransitionStart(fromState, toState, { ctx, order }) {
            // The seller-store-info check: refuse checkout when no driver could carry the order.
            if (toState === 'ArrangingPayment' && order.type !== OrderType.Seller) {
                const sellers = await sellersOf(ctx, connection, order);
                return routeProblem(sellers, dropOf(order), options.radiusKm);
            }
            if (toState === 'ReadyForDispatch' && order.type === OrderType.Aggregate) {
                return 'An aggregate order is not dispatched; its seller orders are.';
            }
        },
    };
}
