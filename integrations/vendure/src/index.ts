/** Public surface of the dispatcher Vendure plugin. */
export { DispatcherPlugin } from './plugin';
export type { DispatcherPluginOptions, NoDriverRetryOptions } from './options';
export { DispatchService } from './dispatch.service';
export type { DispatchJobData } from './dispatch.service';
export { DeliveryUpdater } from './delivery-updater.service';
export { NoDriverRetries, RETRY_LEASE_MS } from './no-driver-retries.service';
export { DispatcherDeliveryState } from './delivery-state.entity';
export { DispatcherWebhookReceipt } from './webhook-receipt.entity';
export { sign, verify, signedHeaders } from './signing';
export { haversineKm } from './geo';
