/** Custom fields: pickup on the Seller, drop on the shipping Address, delivery progress on the Order. */
import { CustomFieldConfig, LanguageCode } from '@vendure/core';

declare module '@vendure/core/dist/entity/custom-entity-fields' {
    interface CustomSellerFields {
        pickupLatitude: number | null;
        pickupLongitude: number | null;
    }
    interface CustomAddressFields {
        dropLatitude: number | null;
        dropLongitude: number | null;
    }
    interface CustomOrderFields {
        dispatcherDriverId: string | null;
        dispatcherAssignmentId: string | null;
        dispatcherDeliveryStatus: string | null;
        dispatcherDistanceKm: number | null;
    }
}

const en = (value: string) => [{ languageCode: LanguageCode.en, value }];

function coordinate(name: string, label: string, kind: 'lat' | 'lon', isPublic: boolean): CustomFieldConfig {
    const limit = kind === 'lat' ? 85.05112878 : 180;
    return {
        name,
        type: 'float',
        nullable: true,
        public: isPublic,
        min: -limit,
        max: limit,
        label: en(label),
        ui: { tab: 'Delivery' },
    };
}

export const sellerFields: CustomFieldConfig[] = [
    coordinate('pickupLatitude', 'Pickup latitude', 'lat', false),
    coordinate('pickupLongitude', 'Pickup longitude', 'lon', false),
];

// Public so the storefront can set them with the shipping address (they also appear on OrderAddress).
export const addressFields: CustomFieldConfig[] = [
    coordinate('dropLatitude', 'Drop latitude', 'lat', true),
    coordinate('dropLongitude', 'Drop longitude', 'lon', true),
];

function progress(name: string, label: string, type: 'string' | 'float'): CustomFieldConfig {
    // Read-only: only the plugin writes these, from the dispatcher's answers and webhooks.
    return { name, type, nullable: true, readonly: true, public: false, label: en(label), ui: { tab: 'Delivery' } } as CustomFieldConfig;
}

export const orderFields: CustomFieldConfig[] = [
    progress('dispatcherDriverId', 'Driver', 'string'),
    progress('dispatcherAssignmentId', 'Assignment', 'string'),
    progress('dispatcherDeliveryStatus', 'Delivery status', 'string'),
    progress('dispatcherDistanceKm', 'Pickup distance (km)', 'float'),
];
