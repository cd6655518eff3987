/** DispatcherPlugin: books delivery drivers for Vendure orders through the dispatcher service. */
import { PluginCommonModule, Type, VendurePlugin } from '@vendure/core';

import { DISPATCHER_PLUGIN_OPTIONS, WEBHOOK_ROUTE } from './constants';
import { addressFields, orderFields, sellerFields } from './custom-fields';
import { DispatcherDeliveryState } from './delivery-state.entity';
import { DeliveryUpdater } from './delivery-updater.service';
import { DispatchService } from './dispatch.service';
import { DispatcherPluginOptions, resolveOptions, ResolvedOptions } from './options';
import { dispatcherOrderProcess } from './order-process';
import { rawBodyMiddleware } from './raw-body.middleware';
import { DispatcherWebhookController } from './webhook.controller';
import { DispatcherWebhookReceipt } from './webhook-receipt.entity';

@VendurePlugin({
    imports: [PluginCommonModule],
    entities: [DispatcherDeliveryState, DispatcherWebhookReceipt],
    controllers: [DispatcherWebhookController],
    providers: [
        { provide: DISPATCHER_PLUGIN_OPTIONS, useFactory: () => DispatcherPlugin.options },
        DeliveryUpdater,
        DispatchService,
    ],
    configuration: config => {
        const options = DispatcherPlugin.options;
        config.customFields.Seller.push(...sellerFields);
        config.customFields.Address.push(...addressFields);
        config.customFields.Order.push(...orderFields);
        config.orderOptions.process.push(dispatcherOrderProcess(options));
        // Before the framework's JSON parser, so the signature is checked over the bytes as sent.
        config.apiOptions.middleware.push({ route: `/${WEBHOOK_ROUTE}`, handler: rawBodyMiddleware, beforeListen: true });
        return config;
    },
    compatibility: '^3.0.0',
})
export class DispatcherPlugin {
    static options: ResolvedOptions;

    static init(options: DispatcherPluginOptions): Type<DispatcherPlugin> {
        DispatcherPlugin.options = resolveOptions(options);
        return DispatcherPlugin;
    }
}
