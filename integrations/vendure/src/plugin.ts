/** DispatcherPlugin: books delivery drivers for Vendure orders through the dispatcher service. */
import { CustomFieldConfig, PluginCommonModule, Type, VendurePlugin } from '@vendure/core';

import { DISPATCHER_PLUGIN_OPTIONS, WEBHOOK_ROUTE } from './constants';
import { addressFields, orderFields, sellerFields } from './custom-fields';
import { DispatcherDeliveryState } from './delivery-state.entity';
import { DeliveryUpdater } from './delivery-updater.service';
import { DispatchService } from './dispatch.service';
import { NoDriverRetries } from './no-driver-retries.service';
import { DispatcherPluginOptions, resolveOptions, ResolvedOptions } from './options';
import { dispatcherOrderProcess } from './order-process';
import { rawBodyMiddleware } from './raw-body.middleware';
import { DispatcherWebhookController } from './webhook.controller';
import { DispatcherWebhookReceipt } from './webhook-receipt.entity';

const PROCESS_MARK = Symbol('dispatcherOrderProcess');

@VendurePlugin({
    imports: [PluginCommonModule],
    entities: [DispatcherDeliveryState, DispatcherWebhookReceipt],
    controllers: [DispatcherWebhookController],
    providers: [
        { provide: DISPATCHER_PLUGIN_OPTIONS, useFactory: () => DispatcherPlugin.options },
        DeliveryUpdater,
        NoDriverRetries,
        DispatchService,
    ],
    configuration: config => {
        const options = DispatcherPlugin.options;
        // Idempotent: a process that bootstraps Vendure twice (a restart in tests) configures once.
        const add = (list: CustomFieldConfig[], fields: CustomFieldConfig[]) =>
            list.push(...fields.filter(f => !list.some(g => g.name === f.name)));
        add(config.customFields.Seller, sellerFields);
        add(config.customFields.Address, addressFields);
        add(config.customFields.Order, orderFields);
        if (!config.orderOptions.process.some(p => (p as { [PROCESS_MARK]?: true })[PROCESS_MARK])) {
            config.orderOptions.process.push(Object.assign(dispatcherOrderProcess(options), { [PROCESS_MARK]: true }));
        }
        // Before the framework's JSON parser, so the signature is checked over the bytes as sent.
        if (!config.apiOptions.middleware.some(m => m.handler === rawBodyMiddleware)) {
            config.apiOptions.middleware.push({ route: `/${WEBHOOK_ROUTE}`, handler: rawBodyMiddleware, beforeListen: true });
        }
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
