// The smoke test of a compiled sdbuild bundle: load it with the pipeline class its manifest names
// (StableDiffusionPipeline, with its ControlNets when it has any, or StableDiffusionXLPipeline),
// generate one image in one denoising step (two when an SDXL refiner is present, so both UNets run)
// and check the image's size. Any load, shape or prediction error exits non-zero.
//
// Usage: SmokeTest <bundle folder holding manifest.json and Resources/> [output.png]

import CoreGraphics
import CoreML
import Foundation
import ImageIO
import StableDiffusion
import UniformTypeIdentifiers

/// The fields of sdbuild's manifest.json that decide how the Swift package is driven.
struct Manifest: Decodable {
    struct Model: Decodable {
        let path: String
        let compiled: Bool
    }

    let name: String
    let version: String
    let family: String
    let compiled: Bool
    let imageSize: [Int]
    let latentScaleFactor: Float
    let refiner: Bool?
    let models: [String: Model]

    enum CodingKeys: String, CodingKey {
        case name, version, family, compiled, refiner, models
        case imageSize = "image_size"
        case latentScaleFactor = "latent_scale_factor"
    }

    /// ControlNet names as the pipeline takes them: Resources/controlnet/<Name>.mlmodelc gives <Name>.
    var controlNets: [String] {
        models.values.map(\.path)
            .filter { $0.hasPrefix("controlnet/") && $0.hasSuffix(".mlmodelc") }
            .map { String($0.dropFirst("controlnet/".count).dropLast(".mlmodelc".count)) }
            .sorted()
    }
}

enum SmokeTestError: Error, CustomStringConvertible {
    case usage
    case notCompiled(String)
    case badManifest(String)
    case image(String)

    var description: String {
        switch self {
        case .usage:
            return "usage: SmokeTest <bundle folder holding manifest.json and Resources/> [output.png]"
        case .notCompiled(let name):
            return "\(name) is not compiled: Resources holds .mlpackage files; build it on a Mac with Xcode"
        case .badManifest(let problem):
            return "manifest.json: \(problem)"
        case .image(let problem):
            return problem
        }
    }
}

/// A mid-grey RGB image of the generated image's size: a ControlNet's conditioning input.
func greyImage(width: Int, height: Int) throws -> CGImage {
    guard
        let context = CGContext(
            data: nil,
            width: width,
            height: height,
            bitsPerComponent: 8,
            bytesPerRow: 0,
            space: CGColorSpaceCreateDeviceRGB(),
            bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue
        )
    else {
        throw SmokeTestError.image("cannot create a \(width)x\(height) conditioning image")
    }
    context.setFillColor(red: 0.5, green: 0.5, blue: 0.5, alpha: 1)
    context.fill(CGRect(x: 0, y: 0, width: width, height: height))
    guard let image = context.makeImage() else {
        throw SmokeTestError.image("cannot create a \(width)x\(height) conditioning image")
    }
    return image
}

func writePNG(_ image: CGImage, to path: String) throws {
    let url = URL(fileURLWithPath: path)
    guard let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil)
    else {
        throw SmokeTestError.image("cannot write \(path)")
    }
    CGImageDestinationAddImage(destination, image, nil)
    guard CGImageDestinationFinalize(destination) else {
        throw SmokeTestError.image("cannot write \(path)")
    }
}

func run() throws {
    let arguments = Array(CommandLine.arguments.dropFirst())
    guard let bundlePath = arguments.first, arguments.count <= 2 else {
        throw SmokeTestError.usage
    }
    let bundle = URL(fileURLWithPath: bundlePath)
    let manifest = try JSONDecoder().decode(
        Manifest.self, from: Data(contentsOf: bundle.appendingPathComponent("manifest.json")))
    guard manifest.compiled, manifest.models.values.allSatisfy(\.compiled) else {
        throw SmokeTestError.notCompiled(manifest.name)
    }
    guard manifest.imageSize.count == 2 else {
        throw SmokeTestError.badManifest("image_size is \(manifest.imageSize), not [height, width]")
    }
    let height = manifest.imageSize[0]
    let width = manifest.imageSize[1]
    let resources = bundle.appendingPathComponent("Resources")

    let models = MLModelConfiguration()
    // CI's Macs are virtual machines without a Neural Engine; the CPU runs every model the same way.
    models.computeUnits = .cpuOnly

    var generation = PipelineConfiguration(prompt: "a photograph of an astronaut riding a horse")
    generation.seed = 0
    generation.schedulerType = .dpmSolverMultistepScheduler
    generation.encoderScaleFactor = manifest.latentScaleFactor
    generation.decoderScaleFactor = manifest.latentScaleFactor
    let refiner = manifest.refiner ?? false
    generation.stepCount = refiner ? 2 : 1
    generation.refinerStart = 0.5  // with two steps: the base UNet, then the refiner

    let pipeline: StableDiffusionPipelineProtocol
    let description: String
    if manifest.family == "sdxl" {
        generation.originalSize = Float32(height)
        generation.targetSize = Float32(height)
        pipeline = try StableDiffusionXLPipeline(resourcesAt: resources, configuration: models)
        description = "StableDiffusionXLPipeline" + (refiner ? " with its refiner" : "")
    } else if manifest.family == "sd" {
        let controlNets = manifest.controlNets
        pipeline = try StableDiffusionPipeline(
            resourcesAt: resources, controlNet: controlNets, configuration: models)
        generation.controlNetInputs = try controlNets.map { _ in try greyImage(width: width, height: height) }
        description =
            "StableDiffusionPipeline" + (controlNets.isEmpty ? "" : " with ControlNets \(controlNets)")
    } else {
        throw SmokeTestError.badManifest("unknown family \(manifest.family)")
    }
    print("\(manifest.name) \(manifest.version): loading \(resources.path) with \(description)")
    try pipeline.loadResources()
    let images = try pipeline.generateImages(configuration: generation) { progress in
        print("step \(progress.step + 1) of \(progress.stepCount)")
        return true
    }
    guard images.count == 1 else {
        throw SmokeTestError.image("expected 1 image, the pipeline returned \(images.count)")
    }
    guard let image = images[0] else {
        // Only a safety checker withholds an image; with seeded random weights it may flag anything.
        guard pipeline.canSafetyCheck else {
            throw SmokeTestError.image("the pipeline returned no image and has no safety checker to withhold one")
        }
        print("ok: every model ran; the safety checker withheld the image")
        return
    }
    guard image.width == width, image.height == height else {
        throw SmokeTestError.image("the image is \(image.width)x\(image.height), the manifest says \(width)x\(height)")
    }
    if arguments.count == 2 {
        try writePNG(image, to: arguments[1])
    }
    print("ok: a \(width)x\(height) image from \(generation.stepCount) step(s)")
}

do {
    try run()
} catch {
    FileHandle.standardError.write(Data("smoke test failed: \(error)\n".utf8))
    exit(1)
}
